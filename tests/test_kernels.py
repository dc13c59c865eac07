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

from jsae.backends import cpu
from jsae.backends.cpu import kernels

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


def test_the_cpu_top_k_takes_the_kernel_with_lax_top_k_values_and_gradient():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(600, 96)).astype(np.float32))
    jitted = jax.jit(lambda a: cpu.kernel_top_k(a, 8))
    text = jitted.lower(x).compile().as_text()
    assert kernels.TOP_K_TARGET in text and 'custom_call_target="TopK"' not in text
    values, indices = jitted(x)
    want_values, want_indices = jax.lax.top_k(x, 8)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(600, 8)).astype(np.float32))
    grad = jax.grad(lambda a: jnp.sum(cpu.kernel_top_k(a, 8)[0] * cotangent))(x)
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
    import jsae
    from jsae.backends.cpu import kernels
    x = jnp.asarray(np.random.default_rng(0).normal(size=(600, 96)).astype(np.float32))
    cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=96, d_sae=96, k=8), total_training_tokens=600,
                           train_batch_size_tokens=600)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = jsae.resolve_plan(cfg)
        values, indices = jax.jit(lambda a: plan.ops().top_k(a, 8))(x)
    want_values, want_indices = jax.lax.top_k(x, 8)
    assert (np.asarray(indices) == np.asarray(want_indices)).all() and (np.asarray(values) == np.asarray(want_values)).all()
    print("available", kernels.available(), "top_k", plan.top_k)
    print("warnings", [str(w.message) for w in caught if "jsae" in str(w.message)])
""")


def probe(env_update: dict) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_update)
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_a_compiler_jsae_warns_once_and_uses_lax_top_k(tmp_path):
    out = probe({"JSAE_CACHE_DIR": str(tmp_path), "CXX": "/bin/false"})
    assert "available False" in out and "top_k xla" in out
    assert "could not compile" in out and "JSAE_CPU_KERNELS=0" in out
    assert out.count("using jax.lax.top_k") == 1


def test_jsae_cpu_kernels_0_turns_the_kernel_off_silently(tmp_path):
    out = probe({"JSAE_CACHE_DIR": str(tmp_path), "JSAE_CPU_KERNELS": "0"})
    assert "available False" in out and "warnings []" in out
    assert not any(tmp_path.iterdir())  # nothing was built


DIRECT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jsae.backends.cpu import kernels
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


# --------------------------------------------------------------------------- encoder_top_k
needs_amx = pytest.mark.skipif(not kernels.encoder_top_k_available(), reason="encoder_top_k needs a CPU with AMX")


def encoder_top_k(x, W, b, s, k):
    return [np.asarray(a) for a in jax.jit(kernels.encoder_top_k, static_argnums=4)(x, W, b, s, k)]


def check_is_a_top_k(values, pre, indices, x, W, b, s, k):
    """values / pre / indices are a top k of h = (x W + b) s: each value is h at its index (float32
    rounding), in descending order, and no entry left out is above the smallest one taken."""
    pre64 = np.asarray(x, np.float64) @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
    h64 = pre64 * np.asarray(s, np.float64)
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(W, np.float64)) * np.abs(s) + np.abs(b * s)
    tolerance = 1e-5 * scale.max(axis=-1, keepdims=True) + 1e-30
    assert indices.shape == values.shape == pre.shape == (*x.shape[:-1], k)
    if k == 0:
        return
    picked = np.take_along_axis(h64, indices, axis=-1)
    np.testing.assert_allclose(values, picked, rtol=0, atol=tolerance.max())
    np.testing.assert_allclose(pre, np.take_along_axis(pre64, indices, axis=-1), rtol=0,
                               atol=1e-5 * np.abs(pre64).max() + 1e-30)
    assert (np.diff(values, axis=-1) <= 0).all(), "not in descending order"
    assert (np.sort(indices, axis=-1)[..., 1:] != np.sort(indices, axis=-1)[..., :-1]).all(), "an index twice"
    left_out = h64.copy()
    np.put_along_axis(left_out, indices, -np.inf, axis=-1)
    assert (left_out.max(axis=-1) <= picked.min(axis=-1) + tolerance[..., 0]).all(), "missed a larger entry"


@needs_amx
@pytest.mark.parametrize("n, K, m, k", [(4096, 768, 16384, 32), (130, 100, 70, 7), (37, 33, 2000, 64),
                                        (64, 64, 512, 200), (16, 32, 64, 64), (5, 768, 1024, 1), (3, 8, 40, 0)])
def test_encoder_top_k_is_the_top_k_of_the_float32_pre_activations(n, K, m, k):
    # K and m off the tiles' multiples of 32, two token blocks (130 > 128), k > 128 (the sorting
    # fallback), k = m and k = 0.
    rng = np.random.default_rng(n + K + m + k)
    x = rng.normal(size=(n, K)).astype(np.float32)
    W = (rng.normal(size=(K, m)) / np.sqrt(K)).astype(np.float32)
    b = (0.1 * rng.normal(size=m)).astype(np.float32)
    s = rng.uniform(0.2, 3.0, size=m).astype(np.float32)
    values, pre, indices = encoder_top_k(x, W, b, s, k)
    check_is_a_top_k(values, pre, indices, x, W, b, s, k)
    if k:  # and, away from float32 near-ties, exactly lax.top_k's choice
        want = np.asarray(jax.lax.top_k((jnp.asarray(x) @ W + b) * s, k)[1])
        assert (indices == want).all(axis=-1).mean() >= 0.99


@needs_amx
def test_encoder_top_k_separates_latents_that_bf16_cannot_tell_apart():
    # Column j is base * (1 + 1e-5 p_j) for a permutation p: neighbours differ by a relative 1e-5,
    # far below bf16's 2^-8 (so the approximate products cannot order them) and far above the
    # float32 rounding of these short, positive dot products (so the exact ones must).
    rng = np.random.default_rng(11)
    n, K, m, k = 64, 32, 1024, 16
    x = np.abs(rng.normal(size=(n, K))).astype(np.float32)
    base = np.abs(rng.normal(size=(K, 1)))
    p = rng.permutation(m)
    W = (base * (1 + 1e-5 * p)).astype(np.float32)
    zeros, ones = np.zeros(m, np.float32), np.ones(m, np.float32)
    values, pre, indices = encoder_top_k(x, W, zeros, ones, k)
    np.testing.assert_array_equal(indices, np.broadcast_to(np.argsort(-p)[:k], (n, k)))
    np.testing.assert_array_equal(values, pre)


@needs_amx
def test_encoder_top_k_ties_and_non_finite_entries_order_as_lax_top_k():
    rng = np.random.default_rng(12)
    n, K, m, k = 40, 48, 300, 20
    # Small integers: every product is exact in bf16 and float32, so h has many exact ties.
    x = rng.integers(-1, 2, size=(n, K)).astype(np.float32)
    W = rng.integers(-1, 2, size=(K, m)).astype(np.float32)
    b = rng.integers(-2, 3, size=m).astype(np.float32)
    s = np.ones(m, np.float32)
    x[3, 5] = np.nan  # a whole row of NaN
    x[4, 0] = np.inf
    W[:, 7] = 0.0
    W[2, 9] = np.inf  # column 9: +-inf or NaN in every row
    b[11] = -np.inf
    s[13] = 0.0
    values, pre, indices = encoder_top_k(x, W, b, s, k)
    h = (jnp.asarray(x) @ W + b) * s
    want_values, want_indices = (np.asarray(a) for a in jax.lax.top_k(h, k))
    # Row 3 is NaN throughout; which NaNs carry a sign bit (and so rank last) depends on the order
    # of operations, so there only the values are compared: all NaN.
    assert np.isnan(values[3]).all()
    rows = np.arange(n) != 3
    np.testing.assert_array_equal(indices[rows], want_indices[rows])
    np.testing.assert_array_equal(values[rows], want_values[rows])
    assert np.isinf(values[4]).any() and (indices == 9).any()  # the infinities did reach the top k


@needs_amx
def test_encoder_top_k_under_vmap_equals_one_call_per_member():
    rng = np.random.default_rng(13)
    n, K, m, k = 50, 40, 200, 6
    x = rng.normal(size=(n, K)).astype(np.float32)
    W = rng.normal(size=(3, K, m)).astype(np.float32)
    b = rng.normal(size=(3, m)).astype(np.float32)
    s = rng.uniform(0.5, 2, size=(3, m)).astype(np.float32)
    mapped = jax.jit(jax.vmap(lambda W, b, s: kernels.encoder_top_k(x, W, b, s, k)))(W, b, s)
    for member in range(3):
        one = encoder_top_k(x, W[member], b[member], s[member], k)
        for got, want in zip(mapped, one, strict=True):
            np.testing.assert_array_equal(np.asarray(got[member]), want)


@needs_amx
def test_encoder_top_k_rejects_bad_operands_clearly():
    x, W, b = jnp.zeros((4, 8)), jnp.zeros((8, 16)), jnp.zeros((16,))
    with pytest.raises(TypeError, match="float32"):
        kernels.encoder_top_k(x.astype(jnp.bfloat16), W, b, None, 2)
    with pytest.raises(ValueError, match="W"):
        kernels.encoder_top_k(x, jnp.zeros((9, 16)), b, None, 2)
    with pytest.raises(ValueError, match="bias"):
        kernels.encoder_top_k(x, W, jnp.zeros((15,)), None, 2)
    with pytest.raises(ValueError, match="0 <= k <= 16"):
        kernels.encoder_top_k(x, W, b, None, 17)
