"""jsae's CPU top-k kernel (jsae/kernels): the same indices as jax.lax.top_k, and a clean fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae import kernels
from jsae.saes import _base

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the CPU top-k kernel could not be built here")


def lax_indices(x, k):
    return np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1])


def kernel_indices(x, k):
    return np.asarray(jax.jit(kernels.top_k_indices, static_argnums=1)(jnp.asarray(x), k))


@pytest.mark.parametrize("shape, k", [((4096, 1024), 32), ((333, 257), 5), ((2, 9), 9), ((5, 64), 1),
                                      ((7, 40), 0), ((3, 5, 100), 7), ((50,), 4)])
def test_same_indices_as_lax_top_k_on_random_rows(shape, k):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(kernel_indices(x, k), lax_indices(x, k))


@pytest.mark.parametrize("k", [1, 3, 16, 64])
def test_ties_resolve_by_lower_index_as_in_lax_top_k(k):
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 3, size=(700, 64)).astype(np.float32)  # many ties in every row
    x[0] = 0.0
    x[1] = 7.0
    np.testing.assert_array_equal(kernel_indices(x, k), lax_indices(x, k))


def test_signed_zeros_infinities_and_nans_order_as_in_lax_top_k():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 37)).astype(np.float32)
    x[0, :6] = [np.nan, -0.0, 0.0, np.inf, -np.inf, np.nan]
    x[1] = np.nan
    x[2] = -0.0
    x[3, ::2] = 0.0
    x[3, 1::2] = -0.0
    x[4] = -np.inf
    x[5, :] = -np.nan  # NaN with the sign bit set: lax.top_k puts it below -inf
    x[6, 10:20] = -np.nan
    for k in (1, 5, 20, 37):
        np.testing.assert_array_equal(kernel_indices(x, k), lax_indices(x, k), err_msg=f"k={k}")


def test_under_vmap_equals_lax_top_k():
    x = np.random.default_rng(3).normal(size=(4, 600, 128)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda a: kernels.top_k_indices(a, 8)))(x)
    np.testing.assert_array_equal(np.asarray(got), lax_indices(x, 8))


def test_row_top_k_takes_the_kernel_with_lax_top_k_values_and_gradient():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(600, 96)).astype(np.float32))
    jitted = jax.jit(lambda a: _base.row_top_k(a, 8))
    text = jitted.lower(x).compile().as_text()
    assert kernels.TOP_K_TARGET in text and 'custom_call_target="TopK"' not in text
    values, indices = jitted(x)
    want_values, want_indices = jax.lax.top_k(x, 8)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(600, 8)).astype(np.float32))
    grad = jax.grad(lambda a: jnp.sum(_base.row_top_k(a, 8)[0] * cotangent))(x)
    want_grad = jax.grad(lambda a: jnp.sum(jax.lax.top_k(a, 8)[0] * cotangent))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad))


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="float32"):
        kernels.top_k_indices(jnp.zeros((4, 8), jnp.bfloat16), 2)
    with pytest.raises(ValueError, match="0 <= k <= 8"):
        kernels.top_k_indices(jnp.zeros((4, 8)), 9)


def test_the_built_library_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("JSAE_CACHE_DIR", str(tmp_path))
    compiler = kernels._compiler()
    path = kernels.build(compiler)
    assert path.parent.parent == tmp_path and path.stat().st_size > 0
    built_at = path.stat().st_mtime_ns
    assert kernels.build(compiler) == path and path.stat().st_mtime_ns == built_at  # not compiled again
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


PROBE = textwrap.dedent("""
    import warnings
    import jax, jax.numpy as jnp, numpy as np
    from jsae import kernels
    from jsae.saes import _base
    x = jnp.asarray(np.random.default_rng(0).normal(size=(600, 96)).astype(np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values, indices = jax.jit(lambda a: _base.row_top_k(a, 8))(x)
    want_values, want_indices = jax.lax.top_k(x, 8)
    assert (np.asarray(indices) == np.asarray(want_indices)).all() and (np.asarray(values) == np.asarray(want_values)).all()
    print("available", kernels.available())
    print("warnings", [str(w.message) for w in caught if "jsae" in str(w.message)])
""")


def probe(env_update: dict) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_update)
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_a_compiler_jsae_warns_once_and_uses_lax_top_k(tmp_path):
    out = probe({"JSAE_CACHE_DIR": str(tmp_path), "CXX": "/bin/false"})
    assert "available False" in out
    assert "could not compile" in out and "JSAE_CPU_KERNELS=0" in out
    assert out.count("using jax.lax.top_k") == 1


def test_jsae_cpu_kernels_0_turns_the_kernel_off_silently(tmp_path):
    out = probe({"JSAE_CACHE_DIR": str(tmp_path), "JSAE_CPU_KERNELS": "0"})
    assert "available False" in out and "warnings []" in out
    assert not any(tmp_path.iterdir())  # nothing was built


DIRECT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jsae import kernels
    x = jnp.asarray(np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32))
    try:
        got = kernels.top_k_indices(x, 5)  # the first call in the process: registers the kernel itself
    except RuntimeError as error:
        print("error", error)
    else:
        print("equal", bool((np.asarray(got) == np.asarray(jax.lax.top_k(x, 5)[1])).all()))
""")


@pytest.mark.parametrize("enabled", [True, False])
def test_top_k_indices_as_the_first_call_registers_the_kernel_or_says_why_not(enabled):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JSAE_CPU_KERNELS="1" if enabled else "0")
    result = subprocess.run([sys.executable, "-c", DIRECT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    if enabled:
        assert result.stdout.strip() == "equal True"
    else:
        assert "error jsae's CPU top-k kernel is not available" in result.stdout and "JSAE_CPU_KERNELS=0" in result.stdout
