"""The CPU back end: replacements for the named primitives (`jsae.saes._ops.Ops`) built on jsae's
CPU kernels (`kernels`) and a BLAS, and the fused Adam update.

Every replacement here returns what the reference returns (up to float rounding where it sums in
another order) and hands inputs it cannot take (another dtype, leading axes the kernel lacks) to
the reference. Which replacements a run uses is decided once, in `jsae.backends.resolve_plan`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jsae.backends.cpu import kernels
from jsae.saes import _ops

Array = jax.Array

# Row blocks of `split_top_k` run as separate top-ks only from this many rows on.
SPLIT_TOP_K_MIN_ROWS = 512


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- top-k
def kernel_top_k(x: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k` from the kernel, on every core, with lax.top_k's derivative: the values'
    tangent is x's at the indices.

    The values come out of the kernel itself: gathering them from x afterwards let XLA fuse that
    gather with x's producer, which cost more than the selection.
    """
    if not kernels.usable(x) or x.dtype != jnp.float32 or x.ndim < 1:
        return _ops.top_k(x, k)
    values, indices = kernels.top_k(x, k)
    return _values_of(values, x, indices), indices


@jax.custom_jvp
def _values_of(values: Array, x: Array, indices: Array) -> Array:
    """`values` (x at `indices`, computed without gradient), differentiable as take_along_axis(x, indices)."""
    return values


@_values_of.defjvp
def _values_of_jvp(primals, tangents):
    values, _, indices = primals
    x_dot = tangents[1]
    return values, jnp.take_along_axis(x_dot, indices, axis=-1, mode="promise_in_bounds")


def split_top_k(x: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k` with a (rows, n) array of many rows split into one top-k per core.

    XLA:CPU's top-k is one single-threaded loop over the rows; top-ks of separate row blocks run
    concurrently. The barriers keep each block's slice a separate input, so XLA keeps them apart.
    """
    parts = cpu_cores()
    if parts < 2 or x.ndim != 2 or x.shape[0] < SPLIT_TOP_K_MIN_ROWS:
        return jax.lax.top_k(x, k)
    outs = [jax.lax.top_k(jax.lax.optimization_barrier(block), k) for block in jnp.array_split(x, parts)]
    return jnp.concatenate([v for v, _ in outs]), jnp.concatenate([i for _, i in outs])


def kernel_top_k_affine(product: Array, b_enc: Array, norms: Array | None, k: int) -> tuple[Array, Array]:
    """`_ops.top_k_affine` in one kernel pass that never stores the pre-activations."""
    if not kernels.usable(product, b_enc, *([] if norms is None else [norms])):
        return _ops.top_k_affine(product, b_enc, norms, k)
    return kernels.top_k_affine(product, b_enc, norms, k)


def split_top_k_affine(product: Array, b_enc: Array, norms: Array | None, k: int) -> tuple[Array, Array]:
    """`_ops.top_k_affine` with its top-ks split over the cores (`split_top_k`)."""
    return _ops.top_k_affine(product, b_enc, norms, k, row_top_k=split_top_k)


# --------------------------------------------------------------------------- products
def blas_matmul(a: Array, b: Array) -> Array:
    """`_ops.matmul` on the dense kernels' BLAS (2-D float32 operands)."""
    if a.ndim == 2 and b.ndim == 2 and kernels.usable(a, b):
        return kernels.matmul(a, b)
    return _ops.matmul(a, b)


def gather_rows_weighted(weights: Array, indices: Array, table: Array) -> Array:
    if kernels.usable(weights, indices, table):
        return kernels.gather_rows_weighted(weights, indices, table)
    return _ops.gather_rows_weighted(weights, indices, table)


def gather_rows_dot(rows: Array, indices: Array, table: Array) -> Array:
    if kernels.usable(rows, indices, table):
        return kernels.gather_rows_dot(rows, indices, table)
    return _ops.gather_rows_dot(rows, indices, table)


def scatter_rows(weights: Array, indices: Array, rows: Array, m: int) -> Array:
    if kernels.usable(weights, indices, rows):
        return kernels.scatter_rows(weights, indices, rows, m)
    return _ops.scatter_rows(weights, indices, rows, m)


def dense_forward(sae_in: Array, shift: Array | None, W_enc: Array, b_enc: Array, W_dec: Array,
                  threshold: Array | None = None, *, bandwidth: float = 1.0,
                  ste_to_input: bool = False) -> _ops.DenseForward:
    """`_ops.dense_forward` on the BLAS kernels (`jsae.backends.cpu.dense`), float32 2-D inputs."""
    from jsae.backends.cpu import dense

    arrays = [a for a in (sae_in, W_enc, b_enc, W_dec, threshold) if a is not None]
    if sae_in.ndim == 2 and all(a.dtype == jnp.float32 for a in arrays):
        return dense.dense_forward(sae_in, shift, W_enc, b_enc, W_dec, threshold, bandwidth=bandwidth,
                                   ste_to_input=ste_to_input)
    return _ops.dense_forward(sae_in, shift, W_enc, b_enc, W_dec, threshold, bandwidth=bandwidth,
                              ste_to_input=ste_to_input)


def encoder_top_k(x: Array, W: Array, bias: Array, scale: Array | None, k: int):
    """The screened top-k of (x W + bias) · scale on the AMX tiles (`kernels.encoder_top_k`)."""
    return kernels.encoder_top_k(x, W, bias, scale, k)


# --------------------------------------------------------------------------- the bundle
def ops(*, top_k: str, sparse_products: str, encoder_product: str, dense_step: str, encoder_screen: bool,
        sparse_topk: bool) -> _ops.Ops:
    """The Ops of a CPU plan: each primitive the kernel's where the plan says so, else the reference."""
    return _ops.Ops(
        name="cpu",
        top_k={"cpu_kernel": kernel_top_k, "xla_split": split_top_k}.get(top_k, _ops.top_k),
        top_k_affine={"cpu_kernel": kernel_top_k_affine, "xla_split": split_top_k_affine}.get(top_k,
                                                                                          _ops.top_k_affine),
        matmul=blas_matmul if encoder_product == "blas" else _ops.matmul,
        gather_rows_weighted=gather_rows_weighted if sparse_products == "cpu_kernel" else _ops.gather_rows_weighted,
        gather_rows_dot=gather_rows_dot if sparse_products == "cpu_kernel" else _ops.gather_rows_dot,
        scatter_rows=scatter_rows if sparse_products == "cpu_kernel" else _ops.scatter_rows,
        dense_forward=dense_forward if dense_step == "cpu_fused" else _ops.dense_forward,
        encoder_top_k=encoder_top_k if encoder_screen else None,
        sparse_topk=sparse_topk,
    )
