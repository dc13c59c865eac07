"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

A BatchTopK SAE whose latent prefixes [0, w) for each width w in `matryoshka_widths` must also
reconstruct the input on their own: one inner MSE per prefix is added to the loss. Saved as a
JumpReLU SAE, like BatchTopK.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jsae._errors import ConfigError
from jsae.saes._base import Array, decoder_row_norms
from jsae.saes._ops import REFERENCE, Ops
from jsae.saes._training import TrainOutput, finish, mse
from jsae.saes.batchtopk import BatchTopKTrainingSAEConfig, encode_decode
from jsae.saes.topk import topk_aux_loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatryoshkaBatchTopKTrainingSAEConfig(BatchTopKTrainingSAEConfig):
    """Training config of a Matryoshka BatchTopK SAE.

    Attributes:
        matryoshka_widths: strictly increasing prefix widths, the last equal to d_sae.
        use_matryoshka_aux_loss: dead latents of each level reconstruct that level's residual.
    """

    architecture = "matryoshka_batchtopk"

    matryoshka_widths: tuple[int, ...] = ()
    use_matryoshka_aux_loss: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))
        super().__post_init__()
        widths = self.matryoshka_widths
        name = f"{type(self).__name__}.matryoshka_widths"
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ConfigError(f"{name} must be a non-empty list of positive integers, got {list(widths)}.")
        if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
            raise ConfigError(f"{name} must be strictly increasing prefix widths, got {list(widths)}.")
        if widths[-1] != self.d_sae:
            raise ConfigError(
                f"{name} are cumulative prefix widths and must end at d_sae={self.d_sae}, got {list(widths)}."
            )


def _prefix_decodes(params: dict, feature_acts: Array, cfg: MatryoshkaBatchTopKTrainingSAEConfig,
                    module, state, include_outer: bool):
    """(width, reconstruction from latents [0, width)) for each level, cumulatively."""
    if cfg.rescale_acts_by_decoder_norm:
        feature_acts = feature_acts * (1 / decoder_row_norms(params["W_dec"]))
    widths = cfg.matryoshka_widths if include_outer else cfg.matryoshka_widths[:-1]
    decoded = params["b_dec"]
    previous = 0
    for width in widths:
        decoded = feature_acts[:, previous:width] @ params["W_dec"][previous:width] + decoded
        previous = width
        yield width, module.apply({"params": params}, decoded, state, method="finish_output")


def training_forward(params: dict, x: Array, *, cfg: MatryoshkaBatchTopKTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops: Ops = REFERENCE) -> TrainOutput:
    feature_acts, hidden_pre, sae_out, module, state = encode_decode(params, x, cfg)
    losses = {"mse_loss": mse(sae_out, x)}
    if cfg.use_matryoshka_aux_loss:
        losses["auxiliary_reconstruction_loss"] = _matryoshka_aux_loss(
            params, x, feature_acts, hidden_pre, dead_mask, cfg, module, state, ops)
    else:
        losses["auxiliary_reconstruction_loss"] = topk_aux_loss(
            x, sae_out, hidden_pre, dead_mask, params["W_dec"],
            rescale=cfg.rescale_acts_by_decoder_norm, coefficient=cfg.aux_loss_coefficient, ops=ops)
    for width, inner in _prefix_decodes(params, feature_acts, cfg, module, state, include_outer=False):
        losses[f"inner_mse_loss_{width}"] = mse(inner, x)
    return finish(losses, feature_acts, hidden_pre, sae_out)


def _matryoshka_aux_loss(params, x, feature_acts, hidden_pre, dead_mask, cfg, module, state, ops) -> Array:
    """Per level: its top dead latents reconstruct the residual of the prefix up to that level."""
    W_dec = params["W_dec"]
    if cfg.rescale_acts_by_decoder_norm:
        W_dec = W_dec / decoder_row_norms(W_dec)[:, None]
    total = jnp.zeros((), jnp.float32)
    previous = 0
    for width, partial_out in _prefix_decodes(params, feature_acts, cfg, module, state, include_outer=True):
        level_loss = topk_aux_loss(
            x, partial_out, hidden_pre[:, previous:width], dead_mask[previous:width], W_dec[previous:width],
            rescale=False, coefficient=1.0, ops=ops)
        total = total + level_loss
        previous = width
    return cfg.aux_loss_coefficient * total


__all__ = ["MatryoshkaBatchTopKTrainingSAEConfig", "training_forward"]
