"""Math shared by every SAE architecture: input preparation, normalisation, decoding, forward.

Each architecture subclasses `BaseSAEModule` and supplies its extra parameters and
`encode_prepared` (the map from the prepared input to (feature_acts, hidden_pre)); the
rest of the inference path (cast, hook_z flattening, normalisation, b_dec, error term)
lives here once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsae._errors import InputError
from jsae.config import SAEConfig

Array = jax.Array
LN_EPS = 1e-5


class InputState(NamedTuple):
    """What `decode` needs to undo the input preparation of the matching `encode`.

    Attributes:
        norm_scale: constant_norm_rescale's `sqrt(d_in)/‖x‖` (..., 1), else None.
        ln_mu: layer_norm mean (..., 1), else None.
        ln_std: layer_norm unbiased std (..., 1), else None.
        d_head: trailing head width when hook_z inputs were flattened, else None.
    """

    norm_scale: Array | None = None
    ln_mu: Array | None = None
    ln_std: Array | None = None
    d_head: int | None = None


class ForwardOutput(NamedTuple):
    """Everything one forward pass computes.

    Attributes:
        sae_out: reconstruction in the input's layout (plus the error term if asked).
        feature_acts: latent activations (..., d_sae).
        hidden_pre: pre-activations (..., d_sae) (gated: the magnitude path's).
        sae_in: the prepared input the encoder saw (..., d_in).
        state: the `InputState` used to undo normalisation and reshaping.
    """

    sae_out: Array
    feature_acts: Array
    hidden_pre: Array
    sae_in: Array
    state: InputState


def kaiming_uniform_rows(key: Array, shape: tuple[int, int], dtype: Any) -> Array:
    """torch.nn.init.kaiming_uniform_ (a=0) for a (rows, fan_in) matrix: U(±sqrt(6 / fan_in))."""
    bound = math.sqrt(6.0 / shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def zeros(_key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    return jnp.zeros(shape, dtype)


def l2_norm(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """Euclidean norm accumulated in float32 and returned in x's dtype (as torch computes it)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(acc)), axis=axis, keepdims=keepdims)).astype(x.dtype)


def decoder_row_norms(W_dec: Array) -> Array:
    """‖W_dec[i]‖ for every latent i, shape (d_sae,)."""
    return l2_norm(W_dec, axis=-1)


def topk_scatter(values: Array, k: int, top_k=jax.lax.top_k) -> Array:
    """Keep the k largest entries of the last axis, relu'd, zeros elsewhere (SAELens' TopK).

    `top_k`: the row top-k to use (`Ops.top_k` in training; lax.top_k's results either way).
    """
    top_values, top_indices = top_k(values, k)
    return jnp.put_along_axis(jnp.zeros_like(values), top_indices, jax.nn.relu(top_values), axis=-1, inplace=False)


class BaseSAEModule(nn.Module):
    """The common Linen module; parameters are named like the SAELens tensors.

    Subclasses override `extra_params` (to declare b_enc, threshold, ...) and
    `encode_prepared`; autoencoders share `prepare_input` and `decode`.
    """

    cfg: SAEConfig

    def setup(self) -> None:
        cfg = self.cfg
        dtype = cfg.jnp_dtype
        self.W_dec = self.param("W_dec", kaiming_uniform_rows, (cfg.d_sae, cfg.d_out), dtype)
        self.W_enc = self.param("W_enc", self.init_W_enc(), (cfg.d_in, cfg.d_sae), dtype)
        self.b_dec = self.param("b_dec", zeros, (cfg.d_out,), dtype)
        self.extra_params()

    def init_W_enc(self):
        """Initialiser of W_enc: SAELens ties the encoder to the decoder at init, W_enc = W_dec.T."""
        W_dec = self.W_dec
        return lambda key, shape, dtype: W_dec.T.astype(dtype)

    def extra_params(self) -> None:
        """Declare the architecture's own parameters (b_enc, threshold, ...)."""

    # ----------------------------------------------------------------- input side
    def check_input(self, x: Array) -> None:
        cfg = self.cfg
        if cfg.reshape_activations == "hook_z" and self.flattens_hook_z:
            if x.ndim < 2 or x.shape[-1] * x.shape[-2] != cfg.d_in:
                raise InputError(
                    f"hook_z input: expected a trailing (n_heads, d_head) with n_heads*d_head = "
                    f"d_in = {cfg.d_in}, got shape {tuple(x.shape)}."
                )
        elif x.ndim < 1 or x.shape[-1] != cfg.d_in:
            raise InputError(f"input: expected a last dimension of d_in = {cfg.d_in}, got shape {tuple(x.shape)}.")

    flattens_hook_z = True

    def prepare_input(self, x: Array) -> tuple[Array, InputState]:
        """Cast, flatten hook_z heads, normalise and subtract b_dec (SAELens' process_sae_in)."""
        x = jnp.asarray(x)
        self.check_input(x)
        cfg = self.cfg
        x = x.astype(cfg.jnp_dtype)
        d_head = None
        if cfg.reshape_activations == "hook_z" and self.flattens_hook_z:
            d_head = x.shape[-1]
            x = x.reshape(*x.shape[:-2], x.shape[-2] * d_head)
        x, state = normalize(x, cfg)
        state = state._replace(d_head=d_head)
        if cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, state

    # ----------------------------------------------------------------- encode
    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        """(feature_acts, hidden_pre) from the prepared input."""
        raise NotImplementedError

    def encode_with_state(self, x: Array) -> tuple[Array, Array, InputState]:
        sae_in, state = self.prepare_input(x)
        feature_acts, hidden_pre = self.encode_prepared(sae_in)
        return feature_acts, hidden_pre, state

    def encode_with_hidden_pre(self, x: Array) -> tuple[Array, Array]:
        """(feature_acts, hidden_pre) of raw input x, as SAELens' method of that name."""
        feature_acts, hidden_pre, _ = self.encode_with_state(x)
        return feature_acts, hidden_pre

    def encode(self, x: Array) -> Array:
        """Latent activations (..., d_sae) of raw input x (..., d_in)."""
        return self.encode_with_state(x)[0]

    # ----------------------------------------------------------------- decode
    def decode_linear(self, feature_acts: Array) -> Array:
        """feature_acts @ W_dec + b_dec in the SAE's own (normalised) space."""
        return feature_acts @ self.W_dec + self.b_dec

    def decode(self, feature_acts: Array, state: InputState | None = None) -> Array:
        """Reconstruction from latents; `state` (from encode) undoes runtime normalisation/hook_z."""
        feature_acts = jnp.asarray(feature_acts)
        if feature_acts.ndim < 1 or feature_acts.shape[-1] != self.cfg.d_sae:
            raise InputError(
                f"decode: expected a last dimension of d_sae = {self.cfg.d_sae}, got shape {tuple(feature_acts.shape)}."
            )
        out = self.decode_linear(feature_acts)
        return self.finish_output(out, state)

    def finish_output(self, out: Array, state: InputState | None) -> Array:
        cfg = self.cfg
        needs_state = cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")
        if state is None and needs_state:
            raise InputError(
                f"decode: normalize_activations={cfg.normalize_activations!r} needs the input "
                "statistics of the matching encode; pass state= (from encode_with_state) "
                "or call the SAE's forward."
            )
        if state is not None:
            out = denormalize(out, state, cfg)
            if state.d_head is not None:
                out = out.reshape(*out.shape[:-1], out.shape[-1] // state.d_head, state.d_head)
        return out

    # ----------------------------------------------------------------- forward
    def forward_with_details(self, x: Array, use_error_term: bool = False) -> ForwardOutput:
        sae_in, state = self.prepare_input(x)
        feature_acts, hidden_pre = self.encode_prepared(sae_in)
        sae_out = self.decode(feature_acts, state)
        if use_error_term:
            # SAELens adds x - recon computed without gradient, so outputs equal x exactly
            # while gradients still flow through the SAE path.
            sae_out = sae_out + jax.lax.stop_gradient(jnp.asarray(x) - sae_out)
        return ForwardOutput(sae_out, feature_acts, hidden_pre, sae_in, state)

    def __call__(self, x: Array, use_error_term: bool = False) -> Array:
        return self.forward_with_details(x, use_error_term).sae_out


def normalize(x: Array, cfg: SAEConfig) -> tuple[Array, InputState]:
    """Runtime input normalisation (identity for none / expected_average_only_in)."""
    mode = cfg.normalize_activations
    if mode == "constant_norm_rescale":
        scale = math.sqrt(cfg.d_in) / l2_norm(x, axis=-1, keepdims=True)
        return x * scale, InputState(norm_scale=scale)
    if mode == "layer_norm":
        # Statistics accumulate in float32 and are rounded to x's dtype, as torch does for bf16.
        acc = jnp.promote_types(x.dtype, jnp.float32)
        mu = jnp.mean(x.astype(acc), axis=-1, keepdims=True).astype(x.dtype)
        centred = x - mu
        std = jnp.std(centred.astype(acc), axis=-1, keepdims=True, ddof=1).astype(x.dtype)  # unbiased
        return centred / (std + LN_EPS), InputState(ln_mu=mu, ln_std=std)
    return x, InputState()


def denormalize(out: Array, state: InputState, cfg: SAEConfig) -> Array:
    mode = cfg.normalize_activations
    if mode == "constant_norm_rescale":
        return out / state.norm_scale
    if mode == "layer_norm":
        return out * state.ln_std + state.ln_mu
    return out


def fold_decoder_norms(params: dict, scale_keys: tuple[str, ...] = ()) -> dict:
    """SAELens' fold_W_dec_norm: W_dec rows to unit norm, W_enc columns and `scale_keys` times the norm.

    Returns a new params dict; the input is left unchanged.
    """
    norms = jnp.maximum(decoder_row_norms(params["W_dec"]), 1e-8)
    out = dict(params)
    out["W_dec"] = params["W_dec"] / norms[:, None]
    out["W_enc"] = params["W_enc"] * norms[None, :]
    for key in scale_keys:
        out[key] = params[key] * norms
    return out


def lp_norm(x: Array, p: float, axis: int = -1) -> Array:
    """(Σ|x|^p)^(1/p) along `axis`, with torch.norm's zero subgradient at x = 0."""
    if p == 1:
        return jnp.sum(jnp.abs(x), axis=axis)
    total = jnp.sum(jnp.abs(x) ** p, axis=axis)
    positive = total > 0
    return jnp.where(positive, jnp.where(positive, total, 1.0) ** (1.0 / p), 0.0)


def training_input(module: BaseSAEModule, params: dict, x: Array) -> tuple[Array, InputState, Array | None]:
    """The encoder's input for a training forward: the prepared input with b_dec held fixed, its
    state, and the shift that carries b_dec's gradient through the input — exactly zero, as
    b_dec - stop_gradient(b_dec) — or None when the SAE does not subtract b_dec from its input.

    b_dec's gradient through the input is then -(Σ_tokens ∂h) W_encᵀ — one vector-matrix product a
    batch — instead of autodiff's per-token (tokens, d_sae) x (d_sae, d_in) product summed
    afterwards: a sixth of a dense step's FLOPs. The input x is data (no gradient), so nothing else
    needs that product.
    """
    b_dec = params["b_dec"]
    frozen = params | {"b_dec": jax.lax.stop_gradient(b_dec)}
    sae_in, state = module.apply({"params": frozen}, x, method="prepare_input")
    shift = b_dec - jax.lax.stop_gradient(b_dec) if module.cfg.apply_b_dec_to_input else None
    return sae_in, state, shift


def training_hidden_pre(module: BaseSAEModule, params: dict, x: Array, dot=jnp.matmul) -> tuple[Array, InputState]:
    """(x̃ - b_dec) W_enc + b_enc for a training forward, and the input state: the module's encoder,
    with b_dec's gradient through the input taken as `training_input` says. `dot` runs the products
    (`Ops.dot`)."""
    sae_in, state, shift = training_input(module, params, x)
    hidden_pre = dot(sae_in, params["W_enc"]) + params["b_enc"]
    if shift is not None:
        hidden_pre = hidden_pre - dot(shift, params["W_enc"])
    return hidden_pre, state


def training_module_cfg(cfg: SAEConfig) -> SAEConfig:
    """Training sees flat (tokens, d_in) batches: the hook_z reshape happens before the SAE."""
    return cfg.replace(reshape_activations="none") if cfg.reshape_activations != "none" else cfg
