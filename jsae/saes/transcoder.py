"""Transcoders: encode activations at one hook, reconstruct another (width d_out).

transcoder: relu(x W_enc + b_enc) W_dec + b_dec; skip_transcoder adds x W_skip^T;
jumprelu_transcoder gates with a threshold like JumpReLU; topk_transcoder keeps the k largest
(jsae's own, saved and loaded by jsae only). As in SAELens, the input is
normalised but never reshaped or shifted by b_dec, and the output is not de-normalised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import (
    Array,
    BaseSAEModule,
    ForwardOutput,
    InputState,
    fold_decoder_norms,
    kaiming_uniform_rows,
    normalize,
    zeros,
)
from jsae.saes.jumprelu import jumprelu
from jsae.saes.topk import TopKFields, TopKSAE


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranscoderConfig(SAEConfig):
    """Config of a transcoder.

    Attributes:
        d_out: width of the output hook.
    """

    architecture = "transcoder"

    d_out: int = 768
    apply_b_dec_to_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out <= 0:
            raise ConfigError(f"{name}.d_out must be a positive integer, got {self.d_out!r}.")
        if self.apply_b_dec_to_input:
            raise ConfigError(f"{name}.apply_b_dec_to_input must be false: b_dec has width d_out, not d_in.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkipTranscoderConfig(TranscoderConfig):
    architecture = "skip_transcoder"


@dataclasses.dataclass(frozen=True, kw_only=True)
class JumpReLUTranscoderConfig(TranscoderConfig):
    architecture = "jumprelu_transcoder"


@dataclasses.dataclass(frozen=True, kw_only=True)
class JumpReLUSkipTranscoderConfig(TranscoderConfig):
    architecture = "jumprelu_skip_transcoder"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKTranscoderConfig(TopKFields, TranscoderConfig):
    """Config of a TopK transcoder (jsae's; SAELens has no TopK transcoder to load it; fields in `TopKFields`)."""

    architecture = "topk_transcoder"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    architecture = "topk_skip_transcoder"


class Transcoder(BaseSAEModule):
    cfg: TranscoderConfig
    flattens_hook_z = False

    def init_W_enc(self):
        return kaiming_uniform_rows  # independent of W_dec, as SAELens initialises transcoders

    def extra_params(self) -> None:
        self.b_enc = self.param("b_enc", zeros, (self.cfg.d_sae,), self.cfg.jnp_dtype)

    def prepare_input(self, x: Array) -> tuple[Array, InputState]:
        x = jnp.asarray(x)
        self.check_input(x)
        return normalize(x.astype(self.cfg.jnp_dtype), self.cfg)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        return jax.nn.relu(hidden_pre), hidden_pre

    def finish_output(self, out: Array, state: InputState | None) -> Array:
        return out  # the output lives at another hook: nothing to undo

    def skip(self, x: Array) -> Array | None:
        return None

    def forward_with_details(self, x: Array, use_error_term: bool = False) -> ForwardOutput:
        if use_error_term:
            raise ConfigError("use_error_term has no meaning for a transcoder (output and input differ).")
        sae_in, state = self.prepare_input(x)
        feature_acts, hidden_pre = self.encode_prepared(sae_in)
        sae_out = self.decode(feature_acts, state)
        skip = self.skip(x)
        if skip is not None:
            sae_out = sae_out + skip
        return ForwardOutput(sae_out, feature_acts, hidden_pre, sae_in, state)


class SkipTranscoder(Transcoder):
    """A ReLU transcoder plus x W_skipᵀ. The JumpReLU and TopK skip transcoders name it before their
    own base: W_skip is created after that base's parameters, and the encoder and decoder stay the base's."""

    cfg: SkipTranscoderConfig

    def extra_params(self) -> None:
        super().extra_params()
        self.W_skip = self.param("W_skip", zeros, (self.cfg.d_out, self.cfg.d_in), self.cfg.jnp_dtype)

    def skip(self, x: Array) -> Array:
        return jnp.asarray(x).astype(self.cfg.jnp_dtype) @ self.W_skip.T


class JumpReLUTranscoder(Transcoder):
    cfg: JumpReLUTranscoderConfig

    def extra_params(self) -> None:
        super().extra_params()
        self.threshold = self.param("threshold", zeros, (self.cfg.d_sae,), self.cfg.jnp_dtype)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        return jumprelu(hidden_pre, self.threshold), hidden_pre


class JumpReLUSkipTranscoder(SkipTranscoder, JumpReLUTranscoder):
    cfg: JumpReLUSkipTranscoderConfig


class TopKTranscoder(Transcoder):
    cfg: TopKTranscoderConfig

    # the TopK SAE's encoder and decoder (rescaled by the decoder norms where the config says so)
    encode_prepared = TopKSAE.encode_prepared
    decode_linear = TopKSAE.decode_linear


class TopKSkipTranscoder(SkipTranscoder, TopKTranscoder):
    cfg: TopKSkipTranscoderConfig


def fold_W_dec_norm(params: dict, cfg: TranscoderConfig) -> dict:
    if isinstance(cfg, TopKTranscoderConfig) and not cfg.rescale_acts_by_decoder_norm:
        raise ConfigError("fold_W_dec_norm on a TopK transcoder needs rescale_acts_by_decoder_norm=True: without it "
                          "folding the decoder norms changes which latents are in the top k.")
    keys = ("b_enc", "threshold") if "threshold" in params else ("b_enc",)
    return fold_decoder_norms(params, scale_keys=keys)
