"""Sparse TopK training: the forward and backward over each token's k active latents only.

The dense TopK step multiplies (tokens, d_sae) matrices with k nonzeros per row: the decoder
product forward and, backward, the decoder, encoder and input gradients. Here only the encoder
product `x̃ W_enc` is dense; after the top-k every other product runs over the (token, latent)
pairs that are active: the decoder forward gathers W_dec rows weighted by the activations, the
W_dec and W_enc gradients add token rows into the active latents' rows, b_enc's gradient is a
segment sum, and b_dec's gradient through the input is `W_enc (Σ_t dh_t)` rather than a
per-token product. `jax.custom_vjp` keeps autodiff from densifying these.

The products run on the step's `Ops` (`jsae.saes._ops`): XLA's gathers and scatters by default,
a back end's replacements where the execution plan chose them. Where the back end supplies an
`encoder_top_k` (a screened top-k that never forms the dense float32 product), not even the
encoder product is formed.

The results equal the dense path (`jsae.saes.topk`) up to float rounding: same selection,
same relu, same decoder-norm rescaling and its gradient.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jsae.saes._base import Array, decoder_row_norms
from jsae.saes._ops import REFERENCE, Ops, pre_activations


def segment_sum(values: Array, indices: Array, m: int) -> Array:
    """Σ of values[t, j] over the pairs whose indices[t, j] = i, for each i < m."""
    return jax.ops.segment_sum(values.reshape(-1), indices.reshape(-1), num_segments=m)


# --------------------------------------------------------------------------- the TopK forward
class SparseTopK(NamedTuple):
    """What the sparse TopK training forward returns.

    Attributes:
        sae_out: reconstruction (n, d_out); the only output that carries a gradient.
        top_acts: the k relu'd activations of each token (n, k), without gradient.
        top_indices: their latent indices (n, k).
        product: the encoder product x̃ W_enc (n, d_sae), without gradient; `pre_activations` of it and
            b_enc (and the decoder norms) gives the pre-activations. None where the top-k came from
            `ops.encoder_top_k`, which never forms it.
    """

    sae_out: Array
    top_acts: Array
    top_indices: Array
    product: Array


def sparse_topk_forward(x: Array, b_dec: Array, W_enc: Array, b_enc: Array, W_dec: Array, *, k: int,
                        rescale: bool, apply_b_dec: bool, k_active: Array | None = None,
                        ops: Ops = REFERENCE) -> SparseTopK:
    """The TopK training forward of `x` (n, d_in) with the sparse backward.

    h = (x̃ W_enc + b_enc) (· ‖W_dec rows‖ when `rescale`), x̃ = x - b_dec when `apply_b_dec`;
    the top k of h per token, relu'd (divided by the norms when rescaling), decode through W_dec
    plus b_dec. Gradients reach x, b_dec, W_enc, b_enc and W_dec through `sae_out` only.
    `k_active` (traced, <= k) keeps only the first k_active ranks, zeros the rest (sweeps over k).
    """
    sae_out, top_acts, top_indices, product = _sparse_topk(x, b_dec, W_enc, b_enc, W_dec, k_active, k, rescale,
                                                           apply_b_dec, ops)
    stop = jax.lax.stop_gradient
    return SparseTopK(sae_out, stop(top_acts), top_indices, None if product is None else stop(product))


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sparse_topk(x, b_dec, W_enc, b_enc, W_dec, k_active, k, rescale, apply_b_dec, ops):
    return _forward(x, b_dec, W_enc, b_enc, W_dec, k_active, k, rescale, apply_b_dec, ops)[0]


def _kept(values: Array, k_active: Array | None) -> Array:
    """Where an activation is kept: relu's positive part, of the first k_active ranks when given."""
    keep = values > 0
    return keep if k_active is None else keep & (jnp.arange(values.shape[-1]) < k_active)


def _forward(x, b_dec, W_enc, b_enc, W_dec, k_active, k, rescale, apply_b_dec, ops):
    sae_in = x - b_dec if apply_b_dec else x
    norms = decoder_row_norms(W_dec) if rescale else None
    if ops.encoder_top_k is not None:
        values, pre_at, indices = ops.encoder_top_k(sae_in, W_enc, b_enc, norms, k)
        product = None
    else:
        product = ops.matmul(sae_in, W_enc)
        values, indices = ops.top_k_affine(product, b_enc, norms, k)
        pre_at = (pre_activations(jnp.take_along_axis(product, indices, axis=-1), b_enc[indices], None)
                  if rescale else None)
    acts = jax.nn.relu(values) if k_active is None else jnp.where(_kept(values, k_active), values, 0)
    # As the dense decode: activations times 1/‖W_dec row‖ (gathered), then the decoder product.
    scaled = acts * (1 / norms)[indices] if rescale else acts
    sae_out = ops.gather_rows_weighted(scaled, indices, W_dec) + b_dec
    pre_at = pre_at if rescale else None
    residuals = (sae_in, W_enc, W_dec, norms, values, indices, scaled, pre_at, k_active)
    return (sae_out, acts, indices, product), residuals


def _backward(k, rescale, apply_b_dec, ops, residuals, cotangents):
    sae_in, W_enc, W_dec, norms, values, indices, scaled, pre_at, k_active = residuals
    kept = _kept(values, k_active)
    g = cotangents[0]  # the other outputs are returned without gradient
    d_sae = W_dec.shape[0]
    d_b_dec = jnp.sum(g, axis=0)
    d_scaled = ops.gather_rows_dot(g, indices, W_dec)
    d_W_dec = ops.scatter_rows(scaled, indices, g, d_sae)
    if rescale:
        inv = 1 / norms
        d_inv = segment_sum(jnp.where(kept, values, 0) * d_scaled, indices, d_sae)
        d_acts = d_scaled * inv[indices]
    else:
        d_acts = d_scaled
    d_values = jnp.where(kept, d_acts, 0)  # relu (and the ranks past k_active)
    if rescale:
        d_norms = segment_sum(d_values * pre_at, indices, d_sae) - d_inv / jnp.square(norms)
        d_pre = d_values * norms[indices]
        d_W_dec = d_W_dec + jax.vjp(decoder_row_norms, W_dec)[1](d_norms.astype(norms.dtype))[0]
    else:
        d_pre = d_values
    d_b_enc = segment_sum(d_pre, indices, d_sae)
    d_W_enc = ops.scatter_rows(d_pre, indices, sae_in, d_sae).T
    d_x = ops.gather_rows_weighted(d_pre, indices, W_enc.T)  # dead code unless x itself is differentiated
    if apply_b_dec:
        d_b_dec = d_b_dec - W_enc @ d_b_enc.astype(W_enc.dtype)  # Σ_t of -d_x, without the per-token product
    dtype = W_enc.dtype
    return (d_x.astype(dtype), d_b_dec.astype(dtype), d_W_enc.astype(dtype), d_b_enc.astype(dtype),
            d_W_dec.astype(dtype), None)


_sparse_topk.defvjp(_forward, _backward)


# --------------------------------------------------------------------------- the aux-k loss
def aux_k_loss(product: Array, x: Array, residual: Array, dead_mask: Array, b_dec: Array, W_enc: Array,
               b_enc: Array, W_dec: Array, *, rescale: bool, apply_b_dec: bool, coefficient: float,
               ops: Ops = REFERENCE) -> Array:
    """`jsae.saes.topk.topk_aux_loss` from the sparse forward's encoder product, with its gradient.

    `product` (held without gradient) must be x̃ W_enc of x and these parameters, or None: then the
    branches that need it (or the dead latents' columns of it) compute it from x. The gradient of
    the pre-activations goes to the parameters through a dense encoder backward. Forward and
    backward each work only when some latent is dead, and pass each other nothing (tokens,
    d_sae)-sized: with autodiff, the branch where nothing is dead would fill such residuals with
    zeros on every step.
    """
    return _aux_k(product, x, residual, dead_mask, b_dec, W_enc, b_enc, W_dec, rescale, apply_b_dec, coefficient,
                  ops)


def _zeros(like_scalar: Array, shape: tuple[int, ...], dtype) -> Array:
    """Zeros that vary over the same mapped axes as `like_scalar` (so both cond branches agree under shard_map)."""
    return jnp.zeros(shape, dtype) + (like_scalar * 0).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _aux_k(product, x, residual, dead_mask, b_dec, W_enc, b_enc, W_dec, rescale, apply_b_dec, coefficient, ops):
    return _aux_k_fwd(product, x, residual, dead_mask, b_dec, W_enc, b_enc, W_dec, rescale, apply_b_dec,
                      coefficient, ops)[0]


def _aux_k_sizes(x: Array, W_enc: Array, dead_mask: Array):
    k_aux = x.shape[-1] // 2
    num_dead = jnp.sum(dead_mask)
    return min(k_aux, W_enc.shape[-1]), num_dead, jnp.minimum(num_dead / k_aux, 1.0)


def encoder_product(product: Array | None, x: Array, b_dec: Array, W_enc: Array, apply_b_dec: bool,
                     columns: Array | None = None, *, ops: Ops = REFERENCE) -> Array:
    """x̃ W_enc (its `columns` only, when given): from `product` where the forward formed it."""
    if product is not None:
        return product if columns is None else product[:, columns]
    sae_in = x - b_dec if apply_b_dec else x
    return ops.matmul(sae_in, W_enc if columns is None else W_enc[:, columns])


def _aux_k_fwd(product, x, residual, dead_mask, b_dec, W_enc, b_enc, W_dec, rescale, apply_b_dec, coefficient, ops):
    k_static, num_dead, scale = _aux_k_sizes(x, W_enc, dead_mask)
    n = x.shape[0]

    def compute(_):  # as topk_aux_loss
        norms = decoder_row_norms(W_dec) if rescale else None
        full = encoder_product(product, x, b_dec, W_enc, apply_b_dec, ops=ops)
        masked = jnp.where(dead_mask, pre_activations(full, b_enc, norms), -jnp.inf)
        values, indices = ops.top_k(masked, k_static)
        values = jnp.where(jnp.arange(k_static) < num_dead, values, 0.0)  # only the dead ones
        acts = jnp.put_along_axis(jnp.zeros_like(full), indices, values, axis=-1, inplace=False)
        if rescale:
            acts = acts * (1 / norms)
        error = ops.dot(acts, W_dec) - residual
        loss = coefficient * scale * jnp.mean(jnp.sum(jnp.square(error), axis=-1))
        return loss.astype(jnp.float32), values, indices, error

    def few_dead(_):
        # At most k_static latents are dead: the aux top-k keeps every dead latent of every token, so
        # its activations are the dead latents' pre-activations; work on those columns only.
        idx, valid = _dead_columns(dead_mask, num_dead, k_static)
        norms = decoder_row_norms(W_dec) if rescale else None
        pre = pre_activations(encoder_product(product, x, b_dec, W_enc, apply_b_dec, idx, ops=ops), b_enc[idx],
                              None if norms is None else norms[idx])
        values = jnp.where(valid, pre, 0.0)
        scaled = values * (1 / norms[idx]) if rescale else values
        error = ops.dot(scaled, W_dec[idx]) - residual
        loss = coefficient * scale * jnp.mean(jnp.sum(jnp.square(error), axis=-1))
        # The dead columns' indices, typed like x (device-varying under shard_map) as the other branches' are.
        indices = _zeros(x[0, 0], (n, k_static), jnp.int32) + idx
        return loss.astype(jnp.float32), values, indices, error

    def nothing_dead(_):
        like = x[0, 0]
        return (_zeros(like, (), jnp.float32), _zeros(like, (n, k_static), W_enc.dtype),
                _zeros(like, (n, k_static), jnp.int32), _zeros(like, residual.shape, residual.dtype))

    branch = _aux_branch(num_dead, k_static)
    loss, values, indices, error = jax.lax.switch(branch, (nothing_dead, few_dead, compute), None)
    return loss, (product, x, dead_mask, b_dec, W_enc, b_enc, W_dec, values, indices, error)


def _aux_branch(num_dead: Array, k_static: int) -> Array:
    """0: nothing dead; 1: at most k_static dead (column path); 2: more (dense path)."""
    return jnp.where(num_dead == 0, 0, jnp.where(num_dead <= k_static, 1, 2))


def _dead_columns(dead_mask: Array, num_dead: Array, k_static: int) -> tuple[Array, Array]:
    """The dead latents' indices padded to k_static (with 0), and which of the k_static slots are real."""
    idx = jnp.nonzero(dead_mask, size=k_static, fill_value=0)[0].astype(jnp.int32)
    return idx, jnp.arange(k_static) < num_dead


def _aux_k_bwd(rescale, apply_b_dec, coefficient, ops, residuals, d_loss):
    product, x, dead_mask, b_dec, W_enc, b_enc, W_dec, values, indices, error = residuals
    k_static, num_dead, scale = _aux_k_sizes(x, W_enc, dead_mask)
    n, d_sae = x.shape[0], W_enc.shape[-1]

    def grads(_):
        d_error = (d_loss * coefficient * scale * 2 / x.shape[0]).astype(error.dtype) * error
        acts = jnp.put_along_axis(jnp.zeros((n, d_sae), W_enc.dtype), indices, values, axis=-1, inplace=False)
        if rescale:
            norms, norms_vjp = jax.vjp(decoder_row_norms, W_dec)
            inv = 1 / norms
            d_W_dec = ops.dot((acts * inv).T, d_error)
            d_scaled = ops.dot(d_error, W_dec.T)
            d_norms = -jnp.sum(d_scaled * acts, axis=0) / jnp.square(norms)
            d_acts = d_scaled * inv
        else:
            d_W_dec = ops.dot(acts.T, d_error)
            d_acts = ops.dot(d_error, W_dec.T)
        d_values = jnp.where(jnp.arange(k_static) < num_dead, jnp.take_along_axis(d_acts, indices, axis=-1), 0.0)
        d_hidden = jnp.put_along_axis(jnp.zeros((n, d_sae), W_enc.dtype), indices, d_values, axis=-1, inplace=False)
        # The dense encoder backward of d_hidden.
        sae_in = x - b_dec if apply_b_dec else x
        if rescale:
            full = encoder_product(product, x, b_dec, W_enc, apply_b_dec, ops=ops)
            d_norms = d_norms + jnp.sum(d_hidden * pre_activations(full, b_enc, None), axis=0)
            d_W_dec = d_W_dec + norms_vjp(d_norms.astype(norms.dtype))[0]
            d_pre = d_hidden * norms
        else:
            d_pre = d_hidden
        d_b_enc = jnp.sum(d_pre, axis=0)
        d_x = ops.dot(d_pre, W_enc.T)
        d_b_dec = -(W_enc @ d_b_enc) if apply_b_dec else jnp.zeros_like(b_dec)
        return d_x, d_b_dec, ops.dot(sae_in.T, d_pre), d_b_enc, d_W_dec

    def few_dead_grads(_):
        # `few_dead`'s backward: values are the dead columns' pre-activations (zero past num_dead),
        # indices[0] those columns; every product is (tokens, k_static)-sized.
        idx = indices[0]
        valid = jnp.arange(k_static) < num_dead
        d_error = (d_loss * coefficient * scale * 2 / x.shape[0]).astype(error.dtype) * error
        W_rows = W_dec[idx]
        sae_in = x - b_dec if apply_b_dec else x
        if rescale:
            norms, norms_vjp = jax.vjp(decoder_row_norms, W_dec)
            inv = 1 / norms[idx]
            d_W_rows = ops.dot((values * inv).T, d_error)
            d_scaled = ops.dot(d_error, W_rows.T)
            d_norms = -jnp.sum(d_scaled * values, axis=0) * jnp.square(inv)
            d_values = jnp.where(valid, d_scaled * inv, 0.0)
            columns = encoder_product(product, x, b_dec, W_enc, apply_b_dec, idx, ops=ops)
            d_norms = d_norms + jnp.sum(d_values * pre_activations(columns, b_enc[idx], None), axis=0)
            d_pre = d_values * norms[idx]
        else:
            d_W_rows = ops.dot(values.T, d_error)
            d_pre = jnp.where(valid, ops.dot(d_error, W_rows.T), 0.0)
        d_b_enc_cols = jnp.sum(d_pre, axis=0)
        W_enc_cols = W_enc[:, idx]
        d_W_dec = jnp.zeros_like(W_dec).at[idx].add(d_W_rows.astype(W_dec.dtype))
        if rescale:
            d_W_dec = d_W_dec + norms_vjp(jnp.zeros_like(norms).at[idx].add(d_norms.astype(norms.dtype)))[0]
        d_b_dec = -(W_enc_cols @ d_b_enc_cols) if apply_b_dec else jnp.zeros_like(b_dec)
        return (ops.dot(d_pre, W_enc_cols.T), d_b_dec, jnp.zeros_like(W_enc).at[:, idx].add(ops.dot(sae_in.T, d_pre)),
                jnp.zeros_like(b_enc).at[idx].add(d_b_enc_cols), d_W_dec)

    def nothing_dead(_):
        like = x[0, 0]
        return tuple(_zeros(like, a.shape, a.dtype) for a in (x, b_dec, W_enc, b_enc, W_dec))

    branch = _aux_branch(num_dead, k_static)
    d_x, d_b_dec, d_W_enc, d_b_enc, d_W_dec = jax.lax.switch(branch, (nothing_dead, few_dead_grads, grads), None)
    return None, d_x, None, None, d_b_dec, d_W_enc, d_b_enc, d_W_dec


_aux_k.defvjp(_aux_k_fwd, _aux_k_bwd)
