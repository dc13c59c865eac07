"""The architecture registry: one explicit dict from SAELens architecture name to its pieces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jsae._errors import ConfigError, close_names
from jsae.config import SAEConfig
from jsae.saes import batchtopk, gated, jumprelu, matryoshka, standard, topk, transcoder
from jsae.saes._base import BaseSAEModule, ForwardOutput, InputState
from jsae.saes._training import TrainOutput


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What jsae knows about one SAELens architecture."""

    name: str
    config_cls: type[SAEConfig]
    module_cls: type[BaseSAEModule]
    fold_W_dec_norm: Callable[[dict, SAEConfig], dict]


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("standard", standard.StandardSAEConfig, standard.StandardSAE, standard.fold_W_dec_norm),
        Architecture("gated", gated.GatedSAEConfig, gated.GatedSAE, gated.fold_W_dec_norm),
        Architecture("jumprelu", jumprelu.JumpReLUSAEConfig, jumprelu.JumpReLUSAE, jumprelu.fold_W_dec_norm),
        Architecture("topk", topk.TopKSAEConfig, topk.TopKSAE, topk.fold_W_dec_norm),
        Architecture("transcoder", transcoder.TranscoderConfig, transcoder.Transcoder, transcoder.fold_W_dec_norm),
        Architecture(
            "skip_transcoder",
            transcoder.SkipTranscoderConfig,
            transcoder.SkipTranscoder,
            transcoder.fold_W_dec_norm,
        ),
        Architecture(
            "jumprelu_transcoder",
            transcoder.JumpReLUTranscoderConfig,
            transcoder.JumpReLUTranscoder,
            transcoder.fold_W_dec_norm,
        ),
        Architecture(
            "jumprelu_skip_transcoder",
            transcoder.JumpReLUSkipTranscoderConfig,
            transcoder.JumpReLUSkipTranscoder,
            transcoder.fold_W_dec_norm,
        ),
    )
}


def get_architecture(name: str, *, where: str = "architecture") -> Architecture:
    """The registry entry for `name`, or a ConfigError listing the known names."""
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: unknown architecture {name!r}; jsae knows {sorted(ARCHITECTURES)}."
            + close_names(str(name), ARCHITECTURES)
        )
    return ARCHITECTURES[name]


@dataclasses.dataclass(frozen=True)
class TrainingArchitecture:
    """What the trainer needs of one trainable architecture.

    Attributes:
        forward: (params, x, *, cfg, coefficients, dead_mask) -> TrainOutput.
        init_extra: cfg -> parameters that do not start at zero / in the SAE dtype.
        project: (params, cfg) -> params, applied before each step (e.g. thresholds >= 0).
        batch_threshold: keeps a BatchTopK running threshold (saved as a JumpReLU threshold).
        dead_latent_loss: has a loss on dead latents behind a `lax.cond` (aux-k); the step then
            branches once on whether any latent is dead (`jsae.training.step.make_train_step`).
        fold_for_inference: (params, cfg) -> params as SAELens saves the trained SAE.
    """

    name: str
    config_cls: type
    forward: Callable[..., TrainOutput]
    init_extra: Callable[[SAEConfig], dict] = lambda cfg: {}
    project: Callable[[dict, SAEConfig], dict] | None = None
    batch_threshold: bool = False
    dead_latent_loss: bool = False
    fold_for_inference: Callable[[dict, SAEConfig], dict] = lambda params, cfg: params


TRAINING_ARCHITECTURES: dict[str, TrainingArchitecture] = {
    arch.name: arch
    for arch in (
        TrainingArchitecture("standard", standard.StandardTrainingSAEConfig, standard.training_forward),
        TrainingArchitecture("gated", gated.GatedTrainingSAEConfig, gated.training_forward),
        TrainingArchitecture(
            "jumprelu",
            jumprelu.JumpReLUTrainingSAEConfig,
            jumprelu.training_forward,
            init_extra=jumprelu.init_training_extra,
            project=jumprelu.project_params,
        ),
        TrainingArchitecture(
            "topk", topk.TopKTrainingSAEConfig, topk.training_forward, dead_latent_loss=True,
            fold_for_inference=topk.to_inference_params
        ),
        TrainingArchitecture(
            "batchtopk", batchtopk.BatchTopKTrainingSAEConfig, batchtopk.training_forward, batch_threshold=True,
            dead_latent_loss=True
        ),
        TrainingArchitecture(
            "matryoshka_batchtopk",
            matryoshka.MatryoshkaBatchTopKTrainingSAEConfig,
            matryoshka.training_forward,
            batch_threshold=True,
            dead_latent_loss=True,
        ),
    )
}


def get_training_architecture(name: str, *, where: str = "architecture") -> TrainingArchitecture:
    if name not in TRAINING_ARCHITECTURES:
        raise ConfigError(
            f"{where}: jsae cannot train architecture {name!r}; it trains {sorted(TRAINING_ARCHITECTURES)}."
            + close_names(str(name), TRAINING_ARCHITECTURES)
        )
    return TRAINING_ARCHITECTURES[name]


def init_params(cfg: SAEConfig, key) -> dict:
    """Freshly initialised parameters for cfg (SAELens' inference-time init)."""
    import jax.numpy as jnp

    module = get_architecture(cfg.architecture).module_cls(cfg)
    shape = (1, 1, cfg.d_in) if cfg.reshape_activations == "hook_z" and module.flattens_hook_z else (1, cfg.d_in)
    return dict(module.init(key, jnp.ones(shape, cfg.jnp_dtype), method="encode")["params"])


__all__ = ["TRAINING_ARCHITECTURES", "TrainOutput", "TrainingArchitecture", "get_training_architecture",
           "init_params", "ARCHITECTURES", "Architecture", "ForwardOutput", "InputState", "get_architecture"]
