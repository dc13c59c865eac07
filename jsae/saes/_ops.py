"""The named primitives a training forward is built from, and their reference implementations.

Architectures compute through an `Ops` bundle: the plain JAX/XLA functions below are the
reference and the default; a back end (`jsae.backends`) supplies replacements for some of them,
chosen once in the run's execution plan. A replacement must return what the reference returns,
up to float rounding (sums in another order), for every input the reference accepts; where it
cannot take an input (a dtype, a shape) it hands it to the reference itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Tokens per iteration of the reference backward loops.
TOKEN_BLOCK = 16
# Slots summed per pass of `gather_rows_weighted` (more per pass and XLA writes out every gathered slot).
SLOT_GROUP = 8
# Latents per block of the blockwise `top_k_affine`.
TOPK_BLOCK = 32


def _acc_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------- top-k
def top_k(x: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k` along the last axis; replacements return the same values and indices (ties,
    signed zeros and NaNs included) and lax.top_k's gradient for the values."""
    return jax.lax.top_k(x, k)


def _barrier_top_k(x: Array, k: int, row_top_k: Callable) -> tuple[Array, Array]:
    # The barriers keep XLA from folding the top-k's slices into their users, which on CPU turns
    # the top-k into a full sort of every row. (One barrier per output: a barrier on both at once
    # can reach XLA as a barrier on the top-k's tuple, which XLA's top-k decomposition rejects.)
    values, indices = row_top_k(x, k)
    return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(indices)


def pre_activations(product: Array, b_enc: Array, norms: Array | None) -> Array:
    """Pre-activations from the encoder product x̃ W_enc, as the dense TopK path computes them."""
    pre = product + b_enc
    return pre * norms if norms is not None else pre


def top_k_affine(product: Array, b_enc: Array, norms: Array | None, k: int, *,
                 row_top_k: Callable = top_k) -> tuple[Array, Array]:
    """`top_k(pre_activations(product, b_enc, norms), k)` without writing the pre-activations out.

    Blockwise and exact (ties aside): a row's k largest entries lie in the k blocks of TOPK_BLOCK
    consecutive latents with the largest maxima, so the top k of those blocks' entries (taken in
    index order, so ties resolve as in lax.top_k) is the row's. Falls back to one top-k where the
    blocks would not pay. No gradient is defined through the selection.
    """
    n, m = product.shape
    block = TOPK_BLOCK
    if m % block or 2 * k * block > m:
        return _barrier_top_k(pre_activations(product, b_enc, norms), k, row_top_k)
    h = pre_activations(product, b_enc, norms)  # fused into the block maxima, never stored
    block_max = jax.lax.reduce_window(h, jnp.array(-jnp.inf, h.dtype), jax.lax.max, (1, block), (1, block), "VALID")
    _, blocks = _barrier_top_k(block_max, k, row_top_k)
    blocks = jnp.sort(blocks, axis=-1)
    candidates = (blocks[:, :, None] * block + jnp.arange(block, dtype=blocks.dtype)).reshape(n, k * block)
    picked = jnp.take_along_axis(product, candidates, axis=-1, mode="promise_in_bounds")
    values, position = _barrier_top_k(
        pre_activations(picked, b_enc[candidates], None if norms is None else norms[candidates]), k, row_top_k)
    return values, jnp.take_along_axis(candidates, position, axis=-1)


# --------------------------------------------------------------------------- products
def dot(a: Array, b: Array) -> Array:
    """a @ b with gradients: the products of an architecture's training forward (a back end may run
    them in a lower compute dtype with float32 accumulation, `jsae.backends.precision`)."""
    return a @ b


def matmul(a: Array, b: Array) -> Array:
    """a @ b where no gradient is taken through the product (the sparse TopK step's encoder product:
    its custom VJPs form W_enc's gradient themselves)."""
    return a @ b


def _varying_zeros(shape: tuple[int, ...], dtype, like: Array) -> Array:
    """Zeros typed to vary over the manual (shard_map) axes `like` varies over: a loop's initial carry
    must have the type its body returns, which varies where the inputs do."""
    axis_type = getattr(jax.typeof(like), "manual_axis_type", None)
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(axis_type.varying), to="varying") if axis_type and axis_type.varying else zeros


def _token_blocks(n: int, body: Callable, carry, block: int = TOKEN_BLOCK):
    """carry = body(start, size, carry) over tokens [0, n) in blocks of `block` (a static tail last)."""
    full = n // block
    if full:
        carry = jax.lax.fori_loop(0, full, lambda b, c: body(b * block, block, c), carry)
    if n % block:
        carry = body(full * block, n % block, carry)
    return carry


def _rows(x: Array, start, size: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, 0)


def gather_rows_weighted(weights: Array, indices: Array, table: Array, *, out_dtype=None) -> Array:
    """Σ_j weights[t, j] · table[indices[t, j]] for every token t: (n, k), (n, k), (m, d) -> (n, d).

    A loop over groups of SLOT_GROUP slots, each one fused pass that gathers and adds its slots:
    no (n, k, d) array is formed. Accumulates in float32 (or wider), returns `out_dtype` (default:
    table's dtype).
    """
    n, k = weights.shape
    acc = _acc_dtype(table.dtype)

    def add_slots(out, w, idx):
        for j in range(w.shape[1]):
            row = table.at[idx[:, j]].get(mode="promise_in_bounds").astype(acc)
            out = out + w[:, j, None].astype(acc) * row
        return out

    def group(g, out):
        start = g * SLOT_GROUP
        return add_slots(out, jax.lax.dynamic_slice_in_dim(weights, start, SLOT_GROUP, 1),
                         jax.lax.dynamic_slice_in_dim(indices, start, SLOT_GROUP, 1))

    groups = k // SLOT_GROUP
    out = _varying_zeros((n, table.shape[1]), acc, weights)
    if groups:
        out = jax.lax.fori_loop(0, groups, group, out)
    out = add_slots(out, weights[:, groups * SLOT_GROUP:], indices[:, groups * SLOT_GROUP:])
    return out.astype(out_dtype or table.dtype)


def gather_rows_dot(rows: Array, indices: Array, table: Array) -> Array:
    """rows[t] · table[indices[t, j]] for every (t, j): (n, d), (n, k), (m, d) -> (n, k) in float32 (or wider)."""
    n, k = indices.shape
    acc = _acc_dtype(table.dtype)

    def body(start, size, out):
        idx = _rows(indices, start, size)
        picked = table.at[idx.reshape(-1)].get(mode="promise_in_bounds").reshape(size, k, -1)
        dots = jnp.einsum("tkd,td->tk", picked, _rows(rows, start, size), preferred_element_type=acc)
        return jax.lax.dynamic_update_slice_in_dim(out, dots, start, 0)

    return _token_blocks(n, body, _varying_zeros((n, k), acc, rows))


def scatter_rows(weights: Array, indices: Array, rows: Array, m: int, *, out_dtype=None) -> Array:
    """out[i] = Σ over (t, j) with indices[t, j] = i of weights[t, j] · rows[t]: -> (m, d) in `out_dtype`
    (default: rows' dtype).

    The transpose of `gather_rows_weighted` with respect to the table; accumulates in float32 (or wider).
    """
    n, k = indices.shape
    acc = _acc_dtype(rows.dtype)

    def body(start, size, out):
        idx = _rows(indices, start, size).reshape(-1)
        w = _rows(weights, start, size).astype(acc)
        updates = (w[:, :, None] * _rows(rows, start, size).astype(acc)[:, None, :]).reshape(size * k, -1)
        return out.at[idx].add(updates, mode="promise_in_bounds")

    return _token_blocks(n, body, _varying_zeros((m, rows.shape[1]), acc, rows)).astype(out_dtype or rows.dtype)


# --------------------------------------------------------------------------- the dense step
class DenseForward(NamedTuple):
    """`dense_forward`'s result.

    Attributes:
        h: activations (tokens, d_sae).
        pre: pre-activations (tokens, d_sae), or None where a replacement does not write them out.
        lin: h W_dec (tokens, d_out): the reconstruction before b_dec.
        sums: Σ_tokens h (d_sae,).
        fired: tokens each latent fired on (d_sae,); no gradient.
        l0: latents that fired, per token (tokens,).
    """

    h: Array
    pre: Array | None
    lin: Array
    sums: Array
    fired: Array
    l0: Array


def dense_forward(sae_in: Array, shift: Array | None, W_enc: Array, b_enc: Array, W_dec: Array,
                  threshold: Array | None = None, *, bandwidth: float = 1.0,
                  ste_to_input: bool = False, dot: Callable = dot) -> DenseForward:
    """A ReLU (threshold None) or JumpReLU SAE's dense training forward.

    pre = sae_in W_enc + b_enc - shift W_enc; h = relu(pre), or pre · (pre > threshold) with the
    rectangle-kernel straight-through estimator of width `bandwidth` for the threshold (and the
    pre-activations with `ste_to_input`; Rajamanoharan et al. 2024, "Jumping Ahead"). `shift` is
    `jsae.saes._base.training_input`'s (None: none): it carries b_dec's gradient through the input
    as one vector-matrix product. Every output but `fired` is differentiable here; a replacement
    needs only lin, sums and l0 to be (the plan asks the architecture whether its loss reads more).
    `dot` runs the three products (`Ops.dot`).
    """
    from jsae.saes.jumprelu import jumprelu_and_step

    pre = dot(sae_in, W_enc) + b_enc
    if shift is not None:
        pre = pre - dot(shift, W_enc)
    if threshold is None:
        h = jax.nn.relu(pre)
        step = jax.lax.stop_gradient((h > 0).astype(h.dtype))
    else:
        h, step = jumprelu_and_step(pre, threshold.astype(pre.dtype), bandwidth, ste_to_input)
    fired = jnp.sum(jax.lax.stop_gradient(step).astype(jnp.float32), axis=0)
    return DenseForward(h, pre, dot(h, W_dec), jnp.sum(h, axis=0), fired, jnp.sum(step, axis=-1))


# --------------------------------------------------------------------------- the bundle
@dataclasses.dataclass(frozen=True)
class Ops:
    """The primitives one training step runs on (hashable: a static argument of jit and custom_vjp).

    Attributes:
        name: what supplied them ("reference", "cpu", ...), for messages.
        top_k, top_k_affine, dot, matmul, gather_rows_weighted, gather_rows_dot, scatter_rows,
            dense_forward: the functions above or their replacements.
        encoder_top_k: (x, W, bias, scale, k) -> (values, pre, indices): the top k of
            (x W + bias) · scale without the dense product, or None where the back end has none.
        sparse_topk: TopK training takes the sparse path (`jsae.saes._sparse_topk`) rather than the
            dense one; both give the same losses and gradients.
        compute_dtype: the dtype the products' inputs are rounded to ("float32": none rounded).
    """

    name: str = "reference"
    top_k: Callable = top_k
    top_k_affine: Callable = top_k_affine
    dot: Callable = dot
    matmul: Callable = matmul
    gather_rows_weighted: Callable = gather_rows_weighted
    gather_rows_dot: Callable = gather_rows_dot
    scatter_rows: Callable = scatter_rows
    dense_forward: Callable = dense_forward
    encoder_top_k: Callable | None = None
    sparse_topk: bool = False
    compute_dtype: str = "float32"

    def replace(self, **changes) -> Ops:
        return dataclasses.replace(self, **changes)


REFERENCE = Ops()
