"""Training transcoders: encode activations at one hook, learn to produce another's.

A transcoder's training batch row holds its input (d_in) and its target (d_out) side by side,
shape (tokens, d_in + d_out), so a batch is one array like an SAE's: the step, sweeps, sharding
over tokens and the shuffle buffer (which moves whole rows) need nothing of their own, and input
and target stay paired. The loss is the SAE's with the target in place of the input (as
sparsify trains transcoders): mse_loss = Σ_features (ŷ - y)² averaged over tokens, plus the
architecture's sparsity term (L1 of standard, aux-k of TopK with the target's residual, L0 of
JumpReLU), the same functions the SAEs use.

normalize_activations "expected_average_only_in" scales input and target by the one factor
s = sqrt(d_in) / E‖x‖ (the step scales whole rows), so the loss weighs like an SAE's on that
input; folding it on saving (W_enc * s, W_dec / s, b_dec / s; W_skip unchanged) maps raw inputs to
raw targets exactly. "none" (the default, as sparsify) trains on the activations as they are.
"""

from __future__ import annotations

import dataclasses

from jsae._errors import ConfigError
from jsae.saes import jumprelu, standard, topk, transcoder
from jsae.saes._base import Array, decoder_row_norms, normalize
from jsae.saes._ops import REFERENCE, Ops
from jsae.saes._training import COMMON_LATENT_AXES, TrainingFields, TrainOutput, check_nonnegative, finish, mse


class TranscoderTrainingFields:
    """What every transcoder training config adds: batches of (input, target) rows, an encoder
    initialised apart from the decoder (they live in different spaces)."""

    tied_encoder_init = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reshape_activations != "none":
            raise ConfigError(f"{type(self).__name__}.reshape_activations must be 'none' (a transcoder reads flat "
                              f"activations), got {self.reshape_activations!r}.")

    @property
    def batch_width(self) -> int:
        """Width of a training batch row: the input's d_in then the target's d_out."""
        return self.d_in + self.d_out

    def split_batch(self, batch: Array) -> tuple[Array, Array]:
        """(input (..., d_in), target (..., d_out)) of a training batch (..., d_in + d_out)."""
        return batch[..., : self.d_in], batch[..., self.d_in :]


class DenseTranscoderTrainingFields(TranscoderTrainingFields):
    """ReLU and JumpReLU transcoders: their step stays XLA's (`dense_implementation` has no other choice)."""

    def dense_step_fusable(self) -> bool:
        """The back ends' fused dense step is written for a reconstruction of the input."""
        return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranscoderTrainingConfig(DenseTranscoderTrainingFields, transcoder.TranscoderConfig,
                               standard.StandardTrainingSAEConfig):
    """Training config of a ReLU transcoder: `StandardTrainingSAEConfig`'s L1 fields and d_out."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkipTranscoderTrainingConfig(DenseTranscoderTrainingFields, transcoder.SkipTranscoderConfig,
                                   standard.StandardTrainingSAEConfig):
    """A ReLU transcoder with a skip connection x W_skipᵀ (W_skip starts at zero)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class JumpReLUTranscoderTrainingConfig(DenseTranscoderTrainingFields, transcoder.JumpReLUTranscoderConfig,
                                       jumprelu.JumpReLUTrainingSAEConfig):
    """Training config of a JumpReLU transcoder: `JumpReLUTrainingSAEConfig`'s fields and d_out."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class JumpReLUSkipTranscoderTrainingConfig(DenseTranscoderTrainingFields, transcoder.JumpReLUSkipTranscoderConfig,
                                           jumprelu.JumpReLUTrainingSAEConfig):
    """A JumpReLU transcoder with a skip connection."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKTranscoderTrainingConfig(TranscoderTrainingFields, transcoder.TopKTranscoderConfig, TrainingFields):
    """Training config of a TopK transcoder (sparsify's transcoders are TopK).

    Attributes:
        aux_loss_coefficient: weight of the aux-k loss (dead latents reconstruct the target's residual).
        rescale_acts_by_decoder_norm: choose the top k as if decoder rows had unit norm (on in training,
            as for TopK SAEs; folded into the encoder on saving).
    """

    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        check_nonnegative(self, "aux_loss_coefficient")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKSkipTranscoderTrainingConfig(TopKTranscoderTrainingConfig):
    """A TopK transcoder with a skip connection."""

    architecture = "topk_skip_transcoder"


def _input(batch: Array, cfg) -> tuple[Array, Array, Array]:
    """(raw input, the encoder's input, target) of a batch: the input cast and normalised, never shifted."""
    x, target = cfg.split_batch(batch)
    x = x.astype(cfg.jnp_dtype)
    sae_in, _ = normalize(x, cfg)
    return x, sae_in, target


def _skip(params: dict, x: Array) -> Array | float:
    return x @ params["W_skip"].T if "W_skip" in params else 0.0


def relu_forward(params: dict, batch: Array, *, cfg, coefficients: dict, dead_mask: Array,
                 ops: Ops = REFERENCE) -> TrainOutput:
    """MSE to the target + the standard SAE's decoder-norm-weighted L1 (`standard.l1_loss`)."""
    x, sae_in, target = _input(batch, cfg)
    out = ops.dense_forward(sae_in, None, params["W_enc"], params["b_enc"], params["W_dec"])
    sae_out = out.lin + params["b_dec"] + _skip(params, x)
    losses = {"mse_loss": mse(sae_out, target), "l1_loss": standard.l1_loss(out, params["W_dec"], cfg,
                                                                           coefficients["l1"])}
    return finish(losses, out.h, out.pre, sae_out)._replace(fired_count=out.fired)


def jumprelu_forward(params: dict, batch: Array, *, cfg, coefficients: dict, dead_mask: Array,
                     ops: Ops = REFERENCE) -> TrainOutput:
    """MSE to the target + the JumpReLU SAE's sparsity losses (`jumprelu.sparsity_losses`)."""
    x, sae_in, target = _input(batch, cfg)
    out = ops.dense_forward(sae_in, None, params["W_enc"], params["b_enc"], params["W_dec"], params["threshold"],
                            bandwidth=cfg.jumprelu_bandwidth, ste_to_input=cfg.jumprelu_ste_to_input)
    sae_out = out.lin + params["b_dec"] + _skip(params, x)
    losses = {"mse_loss": mse(sae_out, target)} | jumprelu.sparsity_losses(out, params, cfg, coefficients["l0"],
                                                                            dead_mask)
    return finish(losses, out.h, out.pre, sae_out)._replace(fired_count=out.fired)


def topk_forward(params: dict, batch: Array, *, cfg, coefficients: dict, dead_mask: Array,
                 ops: Ops = REFERENCE, k: Array | None = None) -> TrainOutput:
    """MSE to the target + the TopK SAE's aux-k loss on the target's residual (`topk.topk_aux_loss`,
    k_aux = d_out // 2); `k` (traced, <= cfg.k) as in `topk.training_forward`."""
    x, sae_in, target = _input(batch, cfg)
    rescale = cfg.rescale_acts_by_decoder_norm
    hidden_pre = sae_in @ params["W_enc"] + params["b_enc"]
    if rescale:
        hidden_pre = hidden_pre * decoder_row_norms(params["W_dec"])
    feature_acts = topk.topk_acts(hidden_pre, cfg.k, k, ops)
    sae_out = topk.act_times_W_dec(feature_acts, params["W_dec"], rescale) + params["b_dec"] + _skip(params, x)
    aux = topk.topk_aux_loss(target, sae_out, hidden_pre, dead_mask, params["W_dec"], rescale=rescale,
                             coefficient=cfg.aux_loss_coefficient, ops=ops)
    losses = {"mse_loss": mse(sae_out, target), "auxiliary_reconstruction_loss": aux}
    return finish(losses, feature_acts, hidden_pre, sae_out)


def training_architectures(TrainingArchitecture) -> list:
    """The transcoder entries of the training registry (`jsae.saes.TRAINING_ARCHITECTURES`)."""
    jumprelu_axes = {**COMMON_LATENT_AXES, "threshold": -1}
    return [
        TrainingArchitecture("transcoder", TranscoderTrainingConfig, relu_forward),
        TrainingArchitecture("skip_transcoder", SkipTranscoderTrainingConfig, relu_forward),
        *(TrainingArchitecture(name, cls, jumprelu_forward, init_extra=jumprelu.init_training_extra,
                               project=jumprelu.project_params, latent_axes=jumprelu_axes)
          for name, cls in (("jumprelu_transcoder", JumpReLUTranscoderTrainingConfig),
                            ("jumprelu_skip_transcoder", JumpReLUSkipTranscoderTrainingConfig))),
        *(TrainingArchitecture(name, cls, topk_forward, dead_latent_loss=True, to_inference=topk.to_inference_params)
          for name, cls in (("topk_transcoder", TopKTranscoderTrainingConfig),
                            ("topk_skip_transcoder", TopKSkipTranscoderTrainingConfig))),
    ]

