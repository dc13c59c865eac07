"""The dense training forward and backward of ReLU (standard) and JumpReLU SAEs on CPU, through
jsae's BLAS kernels (`kernels.dense_encode` and `dense_backward`): the CPU replacement of
`jsae.saes._ops.dense_forward`.

XLA:CPU writes each (tokens, d_sae) intermediate of a dense step (pre-activations, activations,
masks, their cotangents) out to memory between its fusions. The kernels call a BLAS sgemm on
blocks, and do the elementwise work on each block between its products while it is in cache: the
forward in blocks of tokens (x W_enc + b_enc, the activation, its column sums and counts, then the
block's decoder product), the backward in blocks of latents (the block's rows of the W_dec
gradient, its columns of the activations' cotangent, masked into g_pre and summed for b_enc, then
its columns of the W_enc gradient), so g_pre is never written out. The results are the
reference's up to float rounding (sums in another order).

`dense_forward` carries the whole backward as a custom VJP. Only its outputs `lin`, `sums` and
`l0` are differentiable; `h` and `pre` are for metrics (differentiating them raises), so the plan
takes this path only for losses that read nothing else (`dense_step_fusable`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsae.backends.cpu import kernels
from jsae.saes._ops import DenseForward

Array = jax.Array


def dense_forward(x: Array, shift: Array | None, W_enc: Array, b_enc: Array, W_dec: Array, threshold: Array | None = None,
                  *, bandwidth: float = 1.0, ste_to_input: bool = False) -> DenseForward:
    """pre = (x - shift) W_enc + b_enc, h = relu(pre) (threshold None) or pre * (pre > threshold)
    (JumpReLU, with the rectangle-kernel straight-through estimator of width `bandwidth` for the
    threshold, and with `ste_to_input` for the pre-activations too), lin = h W_dec.

    x is data: it gets no gradient. `shift` (`jsae.saes._base.training_input`'s; None: none)
    carries b_dec's gradient through the input, -(Σ_tokens g_pre) W_encᵀ, one vector-matrix product.
    """
    out = _dense(jax.lax.stop_gradient(x), shift, W_enc, b_enc, W_dec, threshold, bandwidth, ste_to_input)
    h, pre, lin, sums, fired, l0 = out
    return DenseForward(h, pre if threshold is not None else None, lin, sums, fired, l0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _dense(x, shift, W_enc, b_enc, W_dec, threshold, bandwidth, ste_to_input):
    return kernels.dense_encode(x if shift is None else x - shift, W_enc, b_enc, W_dec, threshold)


def _dense_fwd(x, shift, W_enc, b_enc, W_dec, threshold, bandwidth, ste_to_input):
    values = [a.value if a is not None else None for a in (x, shift, W_enc, b_enc, W_dec, threshold)]
    x, shift, W_enc, b_enc, W_dec, threshold = values
    sae_in = x if shift is None else x - shift
    out = kernels.dense_encode(sae_in, W_enc, b_enc, W_dec, threshold)
    h, pre = out[0], out[1]
    return out, (sae_in, shift, W_enc, W_dec, h, pre, threshold)


def _dense_bwd(bandwidth, ste_to_input, residuals, cotangents):
    sae_in, shift, W_enc, W_dec, h, pre, threshold = residuals
    g_h, g_pre, g_lin, g_sums, g_fired, g_l0 = cotangents
    for name, g in (("h", g_h), ("pre", g_pre)):
        if not isinstance(g, jax.custom_derivatives.SymbolicZero):
            raise TypeError(f"dense_forward's {name} is not differentiable; differentiate lin, sums or l0 "
                            "(or train with dense_implementation='xla')")
    g_lin, g_sums, g_l0 = (jnp.zeros(z.shape, z.dtype) if isinstance(z, jax.custom_derivatives.SymbolicZero) else z
                           for z in (g_lin, g_sums, g_l0))
    g_W_enc, g_b_enc, g_W_dec, g_threshold = kernels.dense_backward(
        sae_in, W_dec, h, pre, threshold, g_lin, g_sums, g_l0, bandwidth=bandwidth, ste_to_input=ste_to_input)
    g_shift = None if shift is None else -(W_enc @ g_b_enc)  # (d, m) x (m,): no transposed copy of W_enc
    return None, g_shift, g_W_enc, g_b_enc, g_W_dec, (None if threshold is None else g_threshold)


_dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)
