"""jsae's CPU kernels (jsae/kernels): lax.top_k's values and indices, the sparse TopK products'
sums, and a clean fallback."""

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

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels could not be built here")


def lax_indices(x, k):
    return np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1])


def kernel_indices(x, k):
    """The kernel's indices, after checking its values are lax.top_k's bit for bit."""
    values, indices = jax.jit(kernels.top_k, static_argnums=1)(jnp.asarray(x), k)
    want = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[0])
    np.testing.assert_array_equal(np.asarray(values).view(np.uint32), want.view(np.uint32))
    return np.asarray(indices)


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


@pytest.mark.parametrize("k", [1, 8, 32, 64, 128, 129])
@pytest.mark.parametrize("kind", ["few_values", "rounded", "constant_tail"])
def test_rows_with_many_ties_at_the_threshold_equal_lax_top_k(kind, k):
    # Up to k = 128 rows are ranked from 2k chunk maxima; rows with more than 4k candidates at the
    # threshold (few_values) fall back to the selection, as do all rows for k = 129.
    rng = np.random.default_rng(6)
    if kind == "few_values":
        x = rng.integers(-2, 3, size=(300, 1024)).astype(np.float32)
    elif kind == "rounded":
        x = np.round(rng.normal(size=(300, 1024)), 1).astype(np.float32)
    else:
        x = rng.normal(size=(300, 1024)).astype(np.float32)
        x[:, 100:] = -1.0  # most chunks' maximum is the same value
    np.testing.assert_array_equal(kernel_indices(x, k), lax_indices(x, k))


@pytest.mark.parametrize("scaled", [True, False])
def test_top_k_affine_is_the_top_k_of_the_affine_map(scaled):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(700, 512)).astype(np.float32)
    x[0] = np.nan  # NaNs and ties pass through (x + bias) * scale as XLA computes them
    x[1, :300] = 1.0
    bias = rng.normal(size=512).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=512).astype(np.float32) if scaled else None
    affine = jax.jit(lambda a, b, s: (a + b) * s if s is not None else a + b)(x, bias, scale)
    for k in (1, 32, 129):
        values, indices = jax.jit(kernels.top_k_affine, static_argnums=3)(x, bias, scale, k)
        want_values, want_indices = jax.lax.top_k(affine, k)
        np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices), err_msg=f"k={k}")
        np.testing.assert_array_equal(np.asarray(values).view(np.uint32), np.asarray(want_values).view(np.uint32))


def test_top_k_affine_under_vmap_with_mapped_and_shared_bias():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 200, 96)).astype(np.float32)
    biases = rng.normal(size=(3, 96)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=96).astype(np.float32)
    got = jax.jit(jax.vmap(lambda a, b: kernels.top_k_affine(a, b, scale, 8)))(x, biases)
    want = jax.lax.top_k((x + biases[:, None, :]) * scale, 8)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    with pytest.raises(ValueError, match="bias"):
        kernels.top_k_affine(x[0], biases[0, :50], None, 8)


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
    got = jax.jit(jax.vmap(lambda a: kernels.top_k(a, 8)[1]))(x)
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
        kernels.top_k(jnp.zeros((4, 8), jnp.bfloat16), 2)
    with pytest.raises(ValueError, match="0 <= k <= 8"):
        kernels.top_k(jnp.zeros((4, 8)), 9)


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
        got = kernels.top_k(x, 5)[1]  # the first call in the process: registers the kernels itself
    except RuntimeError as error:
        print("error", error)
    else:
        print("equal", bool((np.asarray(got) == np.asarray(jax.lax.top_k(x, 5)[1])).all()))
""")


@pytest.mark.parametrize("enabled", [True, False])
def test_top_k_as_the_first_call_registers_the_kernels_or_says_why_not(enabled):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JSAE_CPU_KERNELS="1" if enabled else "0")
    result = subprocess.run([sys.executable, "-c", DIRECT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    if enabled:
        assert result.stdout.strip() == "equal True"
    else:
        assert "error jsae's CPU kernels are not available" in result.stdout and "JSAE_CPU_KERNELS=0" in result.stdout


# ----------------------------------------------------------------------------- sparse products
def slots(rng, batch, n, k, m, d):
    """Random weights, indices (a few out of range) and operands with leading axes `batch`."""
    weights = rng.normal(size=(*batch, n, k)).astype(np.float32)
    indices = rng.integers(0, m, size=(*batch, n, k)).astype(np.int32)
    indices.reshape(-1)[:: 97] = m + 3  # out of range: contributes nothing
    indices.reshape(-1)[1:: 89] = -1
    return weights, indices, rng.normal(size=(*batch, n, d)).astype(np.float32), rng.normal(size=(*batch, m, d)).astype(np.float32)


def reference_products(weights, indices, rows, table):
    """The three products in float64 numpy, over the leading axes."""
    m = table.shape[-2]
    valid = (indices >= 0) & (indices < m)
    safe = np.where(valid, indices, 0)
    picked = np.take_along_axis(table[..., None, :, :].astype(np.float64),
                                safe[..., None].astype(np.int64), axis=-2)  # (..., n, k, d)
    picked = np.where(valid[..., None], picked, 0.0)
    dots = np.einsum("...nkd,...nd->...nk", picked, rows.astype(np.float64))
    weighted = np.einsum("...nk,...nkd->...nd", weights.astype(np.float64), picked)
    scattered = np.zeros(table.shape, np.float64)
    for b in np.ndindex(*indices.shape[:-2]):
        w = np.where(valid[b], weights[b], 0.0).astype(np.float64)
        np.add.at(scattered[b], safe[b].reshape(-1), (w[..., None] * rows[b][:, None, :]).reshape(-1, rows.shape[-1]))
    return dots, weighted, scattered


def kernel_products(weights, indices, rows, table):
    m = table.shape[-2]
    return jax.jit(lambda w, i, r, t: (kernels.gather_rows_dot(r, i, t), kernels.gather_rows_weighted(w, i, t),
                                       kernels.scatter_rows(w, i, r, m)))(weights, indices, rows, table)


@pytest.mark.parametrize("batch, n, k, m, d", [((), 4096, 32, 1024, 128), ((), 333, 7, 50, 13), ((3,), 40, 4, 512, 16),
                                               ((2, 2), 17, 3, 9, 140), ((), 5, 1, 1, 1), ((), 64, 3, 37, 70)])
def test_sparse_products_equal_their_definitions(batch, n, k, m, d):
    # d = 140 and 70: more than one pass of the scatter's 64 columns, with a tail.
    args = slots(np.random.default_rng(7), batch, n, k, m, d)
    for got, want, name in zip(kernel_products(*args), reference_products(*args), ["dot", "weighted", "scatter"],
                               strict=True):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()),
                                   err_msg=name)


def test_sparse_products_of_nothing_are_zeros():
    rng = np.random.default_rng(8)
    for n, k in [(6, 0), (0, 3)]:
        weights, indices = np.ones((n, k), np.float32), np.zeros((n, k), np.int32)
        rows, table = rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
        dots, weighted, scattered = kernel_products(weights, indices, rows, table)
        assert dots.shape == (n, k) and weighted.shape == (n, 5) and scattered.shape == (4, 5)
        assert not np.asarray(weighted).any() and not np.asarray(scattered).any()


def test_sparse_products_under_vmap_equal_one_call_each():
    args = slots(np.random.default_rng(9), (4,), 64, 5, 96, 24)
    weights, indices, rows, table = args
    shared_table = table[0]  # not mapped: broadcast to every member
    mapped = jax.jit(jax.vmap(lambda w, i, r: (kernels.gather_rows_dot(r, i, shared_table),
                                               kernels.scatter_rows(w, i, r, 96))))(weights, indices, rows)
    for b in range(4):
        one = kernel_products(weights[b], indices[b], rows[b], shared_table)
        np.testing.assert_array_equal(np.asarray(mapped[0][b]), np.asarray(one[0]))
        np.testing.assert_array_equal(np.asarray(mapped[1][b]), np.asarray(one[2]))


def test_scatter_rows_is_deterministic_and_sums_in_float32():
    # Each output row is summed by one thread over its slots in (t, j) order: the same bits on every
    # call, and as close to a sequential float32 sum as rounding (or fused multiply-adds) allow.
    rng = np.random.default_rng(10)
    weights, indices, rows, _ = slots(rng, (), 2000, 8, 64, 32)
    indices = np.abs(indices) % 64
    scatter = jax.jit(lambda w, i, r: kernels.scatter_rows(w, i, r, 64))
    got = np.asarray(scatter(weights, indices, rows))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(scatter(weights, indices, rows)), got)
    want = np.zeros((64, 32), np.float32)
    for t in range(2000):
        for j in range(8):
            want[indices[t, j]] += weights[t, j] * rows[t]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_sparse_products_reject_bad_operands_clearly():
    w, i, r, t = (jnp.zeros((4, 2)), jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 3)), jnp.zeros((5, 3)))
    with pytest.raises(TypeError, match="int32 indices"):
        kernels.gather_rows_dot(r, i.astype(jnp.float32), t)
    with pytest.raises(TypeError, match="float32 table"):
        kernels.gather_rows_weighted(w, i, t.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        kernels.gather_rows_dot(jnp.zeros((4, 7)), i, t)
    with pytest.raises(ValueError, match="weights"):
        kernels.scatter_rows(jnp.zeros((4, 3)), i, r, 5)
