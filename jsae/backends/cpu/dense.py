"""The dense training forward and backward of ReLU (standard) and JumpReLU SAEs on CPU, through
jsae's BLAS kernels (`jsae.kernels.dense_encode` and `dense_backward`).

XLA:CPU runs a dense step's five products at ~240-280 GFLOP/s on the 2-core machine of
bench/RESULTS.md, and writes each (tokens, d_sae) intermediate — pre-activations, activations,
masks, their cotangents — out to memory between its fusions. The kernels call OpenBLAS' sgemm
(~310-330 GFLOP/s there) on blocks, and do the elementwise work on each block between its
products while it is in cache: the forward in blocks of tokens (x W_enc + b_enc, the activation,
its column sums and counts, then the block's decoder product), the backward in blocks of latents
(the block's rows of the W_dec gradient, its columns of the activations' cotangent, masked into
g_pre and summed for b_enc, then its columns of the W_enc gradient), so g_pre is never written out.
The results are the XLA path's up to float rounding (sums in another order).

`dense_forward` carries the whole backward as a custom VJP. Its differentiable outputs are the
reconstruction before b_dec (`lin`), the activations' column sums (`sums`, what a ReLU SAE's L1
penalty needs) and the per-token count of firing latents (`l0`, what JumpReLU's L0 penalty needs);
the activations `h` and pre-activations `pre` it returns are for metrics and may not be
differentiated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jsae import kernels

Array = jax.Array

DENSE_IMPLEMENTATIONS = ("auto", "xla")


class DenseForward(NamedTuple):
    """`dense_forward`'s result.

    Attributes:
        h: activations (tokens, d_sae); not differentiable.
        pre: pre-activations (tokens, d_sae) for JumpReLU, None for ReLU (not written out).
        lin: h W_dec (tokens, d_in): the reconstruction before b_dec.
        sums: Σ_tokens h (d_sae,).
        fired: tokens each latent fired on (d_sae,); not differentiable.
        l0: latents that fired, per token (tokens,).
    """

    h: Array
    pre: Array | None
    lin: Array
    sums: Array
    fired: Array
    l0: Array


def uses_kernels(cfg) -> bool:
    """Whether a dense step with `cfg` may run on the kernels: its `dense_implementation` is
    "auto", JAX's default backend is the CPU, its dtype is float32 and `kernels.dense_available()`
    (the architecture's `uses_dense_kernels` adds what its losses need)."""
    return (getattr(cfg, "dense_implementation", "xla") == "auto" and jax.default_backend() == "cpu"
            and cfg.jnp_dtype == jnp.float32 and kernels.dense_available())


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
