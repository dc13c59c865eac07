"""The architecture registry: one explicit dict from SAELens architecture name to its pieces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jsae._errors import ConfigError, close_names
from jsae.config import SAEConfig
from jsae.saes import (
    abstopk,
    batchtopk,
    gated,
    jumprelu,
    matching_pursuit,
    matryoshka,
    standard,
    temporal,
    topk,
    transcoder,
    transcoder_training,
)
from jsae.saes._base import BaseSAEModule, ForwardOutput, InputState
from jsae.saes._training import COMMON_LATENT_AXES, TrainOutput


def scale_tensor(value: Any, scaling_factor: float, *, divide: bool) -> np.ndarray:
    """value * s (or / s) as torch computes `tensor *= s` on CPU: IEEE arithmetic with s in the
    tensor's dtype, 16-bit floats in float32 rounded once (NumPy, not XLA, which may turn a division
    by a constant into a multiplication by its reciprocal)."""
    value = np.asarray(value)
    acc = np.dtype(np.float32) if value.dtype.itemsize < 4 else value.dtype
    s = acc.type(scaling_factor)
    return (value.astype(acc) / s if divide else value.astype(acc) * s).astype(value.dtype)


def fold_input_scale(params: dict, cfg: SAEConfig, scaling_factor: float) -> tuple[dict, SAEConfig]:
    """SAELens' fold_activation_norm_scaling_factor: W_enc*s, W_dec/s, b_dec/s, normalize_activations
    -> "none"."""
    out = dict(params)
    out["W_enc"] = scale_tensor(params["W_enc"], scaling_factor, divide=False)
    for name in ("W_dec", "b_dec"):
        out[name] = scale_tensor(params[name], scaling_factor, divide=True)
    return out, cfg.replace(normalize_activations="none")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What jsae knows about one SAELens architecture.

    `fold_activation_norm_scaling_factor`: (params, cfg, s) -> (params, cfg) for inputs that were
    scaled by s in training, as SAELens folds them (`fold_input_scale` unless the architecture differs).
    """

    name: str
    config_cls: type[SAEConfig]
    module_cls: type[BaseSAEModule]
    fold_W_dec_norm: Callable[[dict, SAEConfig], dict]
    fold_activation_norm_scaling_factor: Callable[[dict, SAEConfig, float], tuple[dict, SAEConfig]] = fold_input_scale


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
        Architecture("topk_transcoder", transcoder.TopKTranscoderConfig, transcoder.TopKTranscoder,
                     transcoder.fold_W_dec_norm),
        Architecture("topk_skip_transcoder", transcoder.TopKSkipTranscoderConfig, transcoder.TopKSkipTranscoder,
                     transcoder.fold_W_dec_norm),
        Architecture("abstopk", abstopk.AbsTopKSAEConfig, abstopk.AbsTopKSAE, abstopk.fold_W_dec_norm),
        Architecture("temporal", temporal.TemporalSAEConfig, temporal.TemporalSAE, temporal.fold_W_dec_norm,
                     temporal.fold_activation_norm_scaling_factor),
        Architecture("matching_pursuit", matching_pursuit.MatchingPursuitSAEConfig,
                     matching_pursuit.MatchingPursuitSAE, matching_pursuit.fold_W_dec_norm,
                     matching_pursuit.fold_activation_norm_scaling_factor),
    )
}


def _lookup(registry: dict, name: str, where: str, unknown: str):
    """registry[name], or a ConfigError listing the known names (and the closest)."""
    if name not in registry:
        raise ConfigError(f"{where}: {unknown.format(name=repr(name), known=sorted(registry))}"
                          + close_names(str(name), registry))
    return registry[name]


def _register(registry: dict, entry, kind: str) -> None:
    if entry.name in registry and registry[entry.name] != entry:
        raise ConfigError(f"{kind} named {entry.name!r} is already registered.")
    registry[entry.name] = entry


def get_architecture(name: str, *, where: str = "architecture") -> Architecture:
    """The registry entry for `name`, or a ConfigError listing the known names."""
    return _lookup(ARCHITECTURES, name, where, "unknown architecture {name}; jsae knows {known}.")


def _no_state(cfg: SAEConfig) -> dict:
    return {}


def _same_state(state: dict, out: TrainOutput, cfg: SAEConfig, axis_name: str | None) -> dict:
    return state


def _no_metrics(state: dict, cfg: SAEConfig) -> dict:
    return {}


def _as_saved(params: dict, state: dict, cfg: SAEConfig, input_scale: float) -> dict:
    return params


@dataclasses.dataclass(frozen=True)
class TrainingArchitecture:
    """Everything generic training code (step, trainer, sharding, saving) asks of one trainable
    architecture; it never names one. Register a new one with `register_training_architecture`.

    Attributes:
        name: the config's `architecture`.
        config_cls: its training config class (a `TrainingFields` subclass).
        forward: (params, x, *, cfg, coefficients, dead_mask, ops, **forward_kwargs) -> TrainOutput;
            `ops` (`jsae.saes._ops.Ops`) are the primitives the execution plan chose.
        init_extra: cfg -> parameters that do not start at zero / in the SAE dtype.
        project: (params, cfg) -> params, applied before each step (e.g. thresholds >= 0).
        init_state: cfg -> the architecture's own training state (a pytree; {} for none), kept in
            `TrainState.extra`, checkpointed with the rest.
        update_state: (state, out, cfg, axis_name) -> state after a step (`out` its TrainOutput;
            reduce over `axis_name` where not None).
        state_metrics: (state, cfg) -> metrics to log from that state.
        dead_latent_loss: has a loss on dead latents behind a `lax.cond` (aux-k); the step may then
            branch once on whether any latent is dead (`ExecutionPlan.dead_latent_branch`).
        mixed_precision: its forward runs its products on `ops` (`Ops.dot`, `dense_forward`, the
            sparse path's), so a plan may run them in a lower `compute_dtype`.
        latent_axes: parameter name -> its d_sae axis (negative), for feature sharding; parameters
            not named are replicated.
        to_inference: (params, state, cfg, input_scale) -> params as SAELens saves the trained SAE,
            given parameters with the input scaling `input_scale` already folded into W_enc, W_dec
            and b_dec.
    """

    name: str
    config_cls: type
    forward: Callable[..., TrainOutput]
    init_extra: Callable[[SAEConfig], dict] = lambda cfg: {}
    project: Callable[[dict, SAEConfig], dict] | None = None
    init_state: Callable[[SAEConfig], Any] = _no_state
    update_state: Callable[..., Any] = _same_state
    state_metrics: Callable[[Any, SAEConfig], dict] = _no_metrics
    dead_latent_loss: bool = False
    mixed_precision: bool = False
    latent_axes: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(COMMON_LATENT_AXES))
    to_inference: Callable[[dict, Any, SAEConfig, float], dict] = _as_saved


TRAINING_ARCHITECTURES: dict[str, TrainingArchitecture] = {
    arch.name: arch
    for arch in (
        TrainingArchitecture("standard", standard.StandardTrainingSAEConfig, standard.training_forward,
                             mixed_precision=True),
        TrainingArchitecture("gated", gated.GatedTrainingSAEConfig, gated.training_forward,
                             latent_axes=gated.LATENT_AXES),
        TrainingArchitecture(
            "jumprelu",
            jumprelu.JumpReLUTrainingSAEConfig,
            jumprelu.training_forward,
            init_extra=jumprelu.init_training_extra,
            project=jumprelu.project_params,
            latent_axes=jumprelu.LATENT_AXES,
            mixed_precision=True,
        ),
        TrainingArchitecture(
            "topk", topk.TopKTrainingSAEConfig, topk.training_forward, dead_latent_loss=True,
            to_inference=topk.to_inference_params, mixed_precision=True,
        ),
        batchtopk.training_architecture("batchtopk", batchtopk.BatchTopKTrainingSAEConfig, batchtopk.training_forward),
        batchtopk.training_architecture("matryoshka_batchtopk", matryoshka.MatryoshkaBatchTopKTrainingSAEConfig,
                                        matryoshka.training_forward),
        *transcoder_training.training_architectures(TrainingArchitecture),
        TrainingArchitecture("matching_pursuit", matching_pursuit.MatchingPursuitTrainingSAEConfig,
                             matching_pursuit.training_forward, latent_axes=matching_pursuit.LATENT_AXES),
    )
}


def register_training_architecture(arch: TrainingArchitecture) -> None:
    """Make `arch` trainable by name (`TrainConfig`, YAML `sae.architecture`, the trainer).

    Its saved form must be an architecture `ARCHITECTURES` knows (the config's
    `inference_architecture`, else its own name registered with `register_architecture`).
    """
    _register(TRAINING_ARCHITECTURES, arch, "a training architecture")


def register_architecture(arch: Architecture) -> None:
    """Make `arch` loadable and savable by name (cfg.json `architecture`)."""
    _register(ARCHITECTURES, arch, "an architecture")


def get_training_architecture(name: str, *, where: str = "architecture") -> TrainingArchitecture:
    """The training registry entry for `name`, or a ConfigError listing the trainable names."""
    return _lookup(TRAINING_ARCHITECTURES, name, where, "jsae cannot train architecture {name}; it trains {known}.")


def init_params(cfg: SAEConfig, key) -> dict:
    """Freshly initialised parameters for cfg (SAELens' inference-time init)."""
    import jax.numpy as jnp

    module = get_architecture(cfg.architecture).module_cls(cfg)
    shape = (1, 1, cfg.d_in) if cfg.reshape_activations == "hook_z" and module.flattens_hook_z else (1, cfg.d_in)
    return dict(module.init(key, jnp.ones(shape, cfg.jnp_dtype), method="encode")["params"])


__all__ = ["TRAINING_ARCHITECTURES", "TrainOutput", "TrainingArchitecture", "get_training_architecture",
           "register_architecture", "register_training_architecture",
           "init_params", "ARCHITECTURES", "Architecture", "ForwardOutput", "InputState", "get_architecture"]
