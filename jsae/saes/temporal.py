"""Temporal SAE (Bhalla et al. 2025, arXiv:2511.01836; SAELens' sae_lens/saes/temporal_sae.py), inference.

Each token's activation is split into a part predicted from the earlier tokens of its sequence
and a novel part. Causal attention layers over the latent codes predict codes z_pred; the
residual left after projecting their reconstruction out of x̃ is encoded sparsely into z_novel
(the SAE's features). forward decodes z_novel + z_pred; decode decodes z_novel alone.

Inputs are (batch, seq, d_in) (or (seq, d_in), one sequence). The encoder is W_decᵀ when
tied_weights, else W_enc. `constant_scalar_rescale` multiplies inputs by
activation_normalization_factor and divides outputs by it. Parameter names are SAELens'
(`attn_layers.{i}.{k_ctx,q_target,v_ctx,c_proj}.{weight,bias}`, torch Linear layout (out, in)).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jsae._errors import ConfigError, InputError
from jsae.config import NORMALIZE_MODES, SAEConfig
from jsae.saes._base import (
    Array,
    BaseSAEModule,
    ForwardOutput,
    InputState,
    kaiming_uniform_rows,
    l2_norm,
    normalize,
    zeros,
)

SCALAR_RESCALE = "constant_scalar_rescale"
DIFF_TYPES = ("relu", "topk")
EPS = 1e-6
ATTN_PROJECTIONS = ("k_ctx", "q_target", "v_ctx", "c_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemporalSAEConfig(SAEConfig):
    """Config of a Temporal SAE (field names as SAELens' TemporalSAEConfig).

    Attributes:
        n_heads: attention heads per layer.
        n_attn_layers: attention layers predicting codes from context.
        bottleneck_factor: query/key width is d_sae // bottleneck_factor.
        sae_diff_type: "topk" keeps the kval_topk largest novel codes; "relu" keeps all positive ones.
        kval_topk: k of "topk" (None keeps all).
        tied_weights: the encoder is W_decᵀ (no W_enc); decoding then adds b_dec only when
            apply_b_dec_to_input.
        activation_normalization_factor: the scale of `constant_scalar_rescale`.
    """

    architecture = "temporal"

    n_heads: int = 8
    n_attn_layers: int = 1
    bottleneck_factor: int = 64
    sae_diff_type: str = "topk"
    kval_topk: int | None = None
    tied_weights: bool = True
    activation_normalization_factor: float = 1.0

    normalize_modes = (*NORMALIZE_MODES, SCALAR_RESCALE)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.reshape_activations != "none":
            raise ConfigError(f"{name}.reshape_activations must be 'none', got {self.reshape_activations!r}.")
        if self.sae_diff_type not in DIFF_TYPES:
            raise ConfigError(f"{name}.sae_diff_type must be one of {list(DIFF_TYPES)}, got {self.sae_diff_type!r}.")
        for field in ("n_heads", "n_attn_layers", "bottleneck_factor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "n_attn_layers" else 1):
                raise ConfigError(f"{name}.{field} must be a positive integer, got {value!r}.")
        if self.d_sae % (self.bottleneck_factor * self.n_heads):
            raise ConfigError(f"{name}: d_sae={self.d_sae} must be a multiple of bottleneck_factor * n_heads = "
                              f"{self.bottleneck_factor * self.n_heads}.")
        k = self.kval_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.d_sae):
            raise ConfigError(f"{name}.kval_topk must be None or an integer in [1, d_sae={self.d_sae}], got {k!r}.")

    @property
    def n_embds(self) -> int:
        return self.d_sae // self.bottleneck_factor


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """softmax(q kᵀ / sqrt(d_head) + causal mask) v over (..., heads, seq, d_head)."""
    scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    seq = q.shape[-2]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    scores = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1) @ v


class TemporalSAE(BaseSAEModule):
    cfg: TemporalSAEConfig
    flattens_hook_z = False

    def setup(self) -> None:
        cfg = self.cfg
        dtype = cfg.jnp_dtype
        self.W_dec = self.param("W_dec", kaiming_uniform_rows, (cfg.d_sae, cfg.d_in), dtype)
        self.b_dec = self.param("b_dec", zeros, (cfg.d_in,), dtype)
        if not cfg.tied_weights:
            self.W_enc = self.param("W_enc", lambda key, s, d: self.W_dec.T.astype(d), (cfg.d_in, cfg.d_sae), dtype)
        shapes = {"k_ctx": cfg.n_embds, "q_target": cfg.n_embds, "v_ctx": cfg.d_sae, "c_proj": cfg.d_sae}
        layers = []
        for i in range(cfg.n_attn_layers):
            layer = {}
            for proj, out in shapes.items():
                prefix = f"attn_layers.{i}.{proj}"
                layer[proj] = (self.param(f"{prefix}.weight", kaiming_uniform_rows, (out, cfg.d_sae), dtype),
                               self.param(f"{prefix}.bias", zeros, (out,), dtype))
            layers.append(layer)
        self.layers = layers

    @property
    def encoder(self) -> Array:
        return self.W_dec.T if self.cfg.tied_weights else self.W_enc

    def check_input(self, x: Array) -> None:
        if x.ndim not in (2, 3) or x.shape[-1] != self.cfg.d_in:
            raise InputError(f"temporal SAE input: expected (batch, seq, d_in) or (seq, d_in) with d_in = "
                             f"{self.cfg.d_in}, got shape {tuple(x.shape)}.")

    def prepare_input(self, x: Array) -> tuple[Array, InputState]:
        x = jnp.asarray(x)
        self.check_input(x)
        cfg = self.cfg
        x = x.astype(cfg.jnp_dtype)
        if cfg.normalize_activations == SCALAR_RESCALE:
            x, state = x * cfg.activation_normalization_factor, InputState()
        else:
            x, state = normalize(x, cfg)
        if cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, state

    def finish_output(self, out: Array, state: InputState | None) -> Array:
        if self.cfg.normalize_activations == SCALAR_RESCALE:
            return out / self.cfg.activation_normalization_factor
        return super().finish_output(out, state)

    def _attention(self, layer: dict, z_ctx: Array, z_target: Array) -> Array:
        cfg = self.cfg

        def linear(name, v):
            w, b = layer[name]
            return v @ w.T + b

        def heads(t):  # (..., seq, width) -> (..., n_heads, seq, width / n_heads)
            return jnp.swapaxes(t.reshape(*t.shape[:-1], cfg.n_heads, t.shape[-1] // cfg.n_heads), -2, -3)

        k, v, q = heads(linear("k_ctx", z_ctx)), heads(linear("v_ctx", z_ctx)), heads(linear("q_target", z_target))
        out = jnp.swapaxes(causal_attention(q, k, v), -2, -3)
        return linear("c_proj", out.reshape(*out.shape[:-2], cfg.d_sae))

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        return self.encode_with_predictions_prepared(sae_in)[:2]

    def encode_with_predictions_prepared(self, x: Array) -> tuple[Array, Array, Array]:
        """(z_novel, hidden_pre, z_pred) of the prepared input."""
        cfg = self.cfg
        lam = 1 / (4 * cfg.d_in)
        W_enc = self.encoder
        residual = x
        z_pred = jnp.zeros((*x.shape[:-1], cfg.d_sae), x.dtype)
        for layer in self.layers:
            z_input = jax.nn.relu((residual * lam) @ W_enc)
            z_ctx = jnp.concatenate([jnp.zeros_like(z_input[..., :1, :]), z_input[..., :-1, :]], axis=-2)
            z_layer = jax.nn.relu(self._attention(layer, z_ctx, z_input))
            dz = z_layer @ self.W_dec
            dz_norm = l2_norm(dz, axis=-1, keepdims=True) + EPS
            proj_scale = jnp.sum(dz * residual, axis=-1, keepdims=True) / dz_norm**2
            z_pred = z_pred + z_layer * proj_scale
            residual = residual - proj_scale * dz
        hidden_pre = (residual * lam) @ W_enc
        z_novel = jax.nn.relu(hidden_pre)
        if cfg.sae_diff_type == "topk" and cfg.kval_topk is not None:
            _, indices = jax.lax.top_k(z_novel, cfg.kval_topk)
            mask = jnp.put_along_axis(jnp.zeros_like(z_novel), indices, 1, axis=-1, inplace=False)
            z_novel = z_novel * mask
        return z_novel, hidden_pre, z_pred

    def encode_with_predictions(self, x: Array) -> tuple[Array, Array]:
        """(z_novel, z_pred) of raw input x, as SAELens' method of that name."""
        sae_in, _ = self.prepare_input(x)
        z_novel, _, z_pred = self.encode_with_predictions_prepared(sae_in)
        return z_novel, z_pred

    def decode_linear(self, feature_acts: Array) -> Array:
        out = feature_acts @ self.W_dec
        return out + self.b_dec if (not self.cfg.tied_weights or self.cfg.apply_b_dec_to_input) else out

    def forward_with_details(self, x: Array, use_error_term: bool = False) -> ForwardOutput:
        """The full reconstruction: decode(z_novel + z_pred) (SAELens' TemporalSAE.forward)."""
        if use_error_term:
            raise ConfigError("use_error_term is not supported for temporal SAEs (SAELens' forward ignores it).")
        sae_in, state = self.prepare_input(x)
        z_novel, hidden_pre, z_pred = self.encode_with_predictions_prepared(sae_in)
        sae_out = self.finish_output(self.decode_linear(z_novel + z_pred), state)
        return ForwardOutput(sae_out, z_novel, hidden_pre, sae_in, state)


def fold_W_dec_norm(params: dict, cfg: TemporalSAEConfig) -> dict:
    raise ConfigError("fold_W_dec_norm is not supported for temporal SAEs (nor in SAELens).")


def fold_activation_norm_scaling_factor(params: dict, cfg: TemporalSAEConfig, scaling_factor: float):
    raise ConfigError("fold_activation_norm_scaling_factor is not supported for temporal SAEs (nor in SAELens); "
                      "their input scale is normalize_activations: constant_scalar_rescale.")
