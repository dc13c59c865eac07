"""Sparse TopK on accelerators: a blockwise top-k and the Pallas sparse decoder.

The sparse TopK path (`jsae.saes._sparse_topk`) runs its decoder and backward products as XLA
gathers, scatters and segment sums (the reference `Ops`); on a GPU the plan replaces two of its
primitives:
- the row top-k by `blockwise_top_k`, which never sorts a whole row: the top k of each block of a
  row, then the top k of those candidates (the aux-k loss takes k = d_in / 2 of d_sae latents);
- the decoder `gather_rows_weighted` by the Pallas kernel of `jsae.backends.pallas_decoder`.
Both return what the reference returns (the same values and indices, ties included; the same sums
up to float rounding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsae.backends import pallas_decoder
from jsae.saes import _ops
from jsae.saes._ops import REFERENCE, Ops

# Smallest block of the blockwise top-k; a block holds at least 4 k entries, so the candidates are at
# most a quarter of the row, and a row under two blocks takes one top-k.
MIN_TOPK_BLOCK = 128


def top_k_block(m: int, k: int) -> int | None:
    """The block length `blockwise_top_k` uses for rows of m entries, or None for one top-k."""
    block = max(MIN_TOPK_BLOCK, 1 << (4 * k - 1).bit_length())
    return block if 2 * block <= m else None


def blockwise_top_k(x: jax.Array, k: int, *, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` along the last axis in two stages, with the same values and indices.

    The row is cut into blocks of `block` entries (default `top_k_block`; the last padded with the
    lowest value); each block's top min(k, block) are candidates, kept in block order, and the top k
    of the candidates are the row's: every entry of the row's top k is in its block's top k. Ties go
    to the lower index, as in lax.top_k: within a block by lax.top_k itself, across blocks because the
    candidates keep the blocks' order. lax.top_k's gradient reaches the selected values.
    """
    m = x.shape[-1]
    block = top_k_block(m, k) if block is None else block
    if block is None or block >= m:
        return jax.lax.top_k(x, k)
    n_blocks = -(-m // block)
    pad = n_blocks * block - m
    if pad:
        low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=low)
    per_block = min(k, block)
    values, indices = jax.lax.top_k(x.reshape(*x.shape[:-1], n_blocks, block), per_block)
    indices = indices + (jnp.arange(n_blocks, dtype=indices.dtype) * block)[:, None]
    values = values.reshape(*values.shape[:-2], n_blocks * per_block)
    indices = indices.reshape(values.shape)
    top, position = jax.lax.top_k(values, k)
    return top, jnp.take_along_axis(indices, position, axis=-1)


def ops(*, platform: str, top_k: str, sparse_products: str, sparse_topk: bool, interpret: bool) -> Ops:
    """The Ops of a GPU / TPU plan: the reference, with the blockwise top-k and the Pallas decoder
    where the plan says so. `interpret`: run Pallas kernels in interpret mode (the plan's platform
    is not the one present)."""
    if top_k != "blockwise" and sparse_products != "pallas":
        return REFERENCE.replace(sparse_topk=sparse_topk)
    row_top_k = blockwise_top_k if top_k == "blockwise" else _ops.top_k
    gather = (functools.partial(pallas_decoder.gather_rows_weighted, interpret=interpret)
              if sparse_products == "pallas" else _ops.gather_rows_weighted)
    return REFERENCE.replace(
        name=platform, top_k=row_top_k, top_k_affine=functools.partial(_ops.top_k_affine, row_top_k=row_top_k),
        gather_rows_weighted=gather, sparse_topk=sparse_topk,
    )
