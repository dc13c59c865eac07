"""The sparse TopK decoder as a Pallas kernel (GPU and TPU): Σ_j weights[t, j] · table[indices[t, j]].

`gather_rows_weighted` here returns what `jsae.saes._ops.gather_rows_weighted` returns (the XLA
reference) up to float rounding: each token's k rows of the table are read by index and summed with
their weights in float32, the result written once; no (tokens, d_sae) or (tokens, k, d) array is
formed. A program handles BLOCK_TOKENS tokens and one column block of the output (the largest
power of two up to MAX_BLOCK_COLUMNS that divides d); the table stays in device memory and each row's
block is read by a dynamic slice. k is padded to a power of two with zero weights (Triton's block
shapes are powers of two). `interpret=True` runs the kernel through Pallas' interpreter on any
backend (how the tests run it on CPU); the execution plan sets it where the plan's platform is not
the one present.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsae.saes import _ops

# Tokens per program: a power of two, as GPU (Triton) blocks must be.
BLOCK_TOKENS = 8
MAX_BLOCK_COLUMNS = 512


def _column_block(d: int) -> int:
    block = 1
    while d % (block * 2) == 0 and block * 2 <= MAX_BLOCK_COLUMNS:
        block *= 2
    return block


def _kernel(weights_ref, indices_ref, table_ref, out_ref, *, block: int, k: int):
    d = out_ref.shape[-1]

    def token(t, carry):
        def slot(j, acc):
            row = table_ref[pl.ds(indices_ref[t, j], 1), :].astype(jnp.float32)
            return acc + weights_ref[t, j].astype(jnp.float32) * row

        acc = jax.lax.fori_loop(0, k, slot, jnp.zeros((1, d), jnp.float32))
        out_ref[pl.ds(t, 1), :] = acc.astype(out_ref.dtype)
        return carry

    jax.lax.fori_loop(0, block, token, 0)


def _same_varying_axes(*arrays: jax.Array) -> tuple[list[jax.Array], object]:
    """The arrays cast to vary over every manual (shard_map) axis any of them varies over, and that
    manual axis type (None outside shard_map): the kernel's output varies as its inputs do."""
    types = [getattr(jax.typeof(a), "manual_axis_type", None) for a in arrays]
    axes = frozenset().union(*(t.varying for t in types if t is not None))
    if not axes:
        return list(arrays), None
    cast = [a if t is not None and axes <= t.varying else
            jax.lax.pcast(a, tuple(sorted(axes - (t.varying if t is not None else frozenset()))), to="varying")
            for a, t in zip(arrays, types, strict=True)]
    return cast, jax.typeof(cast[0]).manual_axis_type


def gather_rows_weighted(weights: jax.Array, indices: jax.Array, table: jax.Array, *, out_dtype=None,
                         interpret: bool = False) -> jax.Array:
    """Σ_j weights[t, j] · table[indices[t, j]]: (n, k), (n, k), (m, d) -> (n, d) in `out_dtype` (default:
    table's dtype), accumulated in float32. Indices must lie in [0, m)."""
    n, k = weights.shape
    m, d = table.shape
    block, columns = BLOCK_TOKENS, _column_block(d)
    pad = (-n) % block  # padded tokens and slots have weight 0 and index 0; the tokens are cut off
    k_pad = (1 << (k - 1).bit_length()) - k
    if pad or k_pad:
        weights = jnp.pad(weights, ((0, pad), (0, k_pad)))
        indices = jnp.pad(indices, ((0, pad), (0, k_pad)))
    k += k_pad
    (weights, indices, table), axis_type = _same_varying_axes(weights, indices.astype(jnp.int32), table)
    if interpret and axis_type is not None:
        # Pallas' interpreter cannot yet type its loops under shard_map's varying axes; the XLA gather
        # gives the same sums there.
        return _ops.gather_rows_weighted(weights[:n], indices[:n, :k - k_pad], table, out_dtype=out_dtype)
    shape = ((n + pad, d), out_dtype or table.dtype)
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, k=k),
        out_shape=(jax.ShapeDtypeStruct(*shape) if axis_type is None
                   else jax.ShapeDtypeStruct(*shape, manual_axis_type=axis_type)),
        grid=((n + pad) // block, d // columns),
        in_specs=[pl.BlockSpec((block, k), lambda i, j: (i, 0)), pl.BlockSpec((block, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((m, columns), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block, columns), lambda i, j: (i, j)),
        interpret=interpret,
    )(weights, indices, table)
    return out[:n] if pad else out
