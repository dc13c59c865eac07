"""The training run's config: the SAE to train (its own config) plus optimiser and loop settings."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from jsae._errors import ConfigError
from jsae.config import SAEConfig, dataclass_from_dict
from jsae.saes import get_training_architecture

# How the SAEs of a sweep share a step (see jsae.training.sweep.make_sweep_step).
SWEEP_STRATEGIES = ("auto", "vmap", "unroll", "map")

NONFINITE_POLICIES = ("error", "skip")

# The products' input dtype (float32 accumulation either way) and XLA's float32 product precision;
# see jsae.backends.precision.
COMPUTE_DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "tf32", "float32", "highest")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train one SAE. Field names follow SAELens' runner config where it has one.

    Attributes:
        sae: the training config of the SAE (e.g. `jsae.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=32)`).
        total_training_tokens: tokens to train on; steps = total_training_tokens // train_batch_size_tokens.
        train_batch_size_tokens: global batch size (all devices and processes together).
        lr, lr_end, lr_scheduler_name, lr_warm_up_steps, lr_decay_steps, n_restart_cycles: the lr
            schedule (see `jsae.training.schedules`); lr_end defaults to lr / 10.
        adam_beta1, adam_beta2: Adam's betas. max_grad_norm: global-norm clip (SAELens: 1.0).
        dead_feature_window: a latent that has not fired for this many steps is dead.
        feature_sampling_window: steps over which feature density is accumulated (then reset).
        n_batches_for_norm_estimate: batches used to estimate the expected_average_only_in scale.
        seed: initialisation seed.
        output_path: where the trained SAE folder is written (None: not written).
        checkpoint_path: orbax checkpoints go here (None: no checkpoints, no resume).
        checkpoint_every_n_steps: checkpoint period (0: only on interrupt and at the end).
        n_checkpoints: SAELens folders of the SAE(s) written during the run at SAELens' n_checkpoints evenly
            spaced token counts, to <checkpoint_path>/saes/<tokens seen>/, with the orbax state of that step
            (see jsae.training.sae_checkpoints); 0: none. Needs checkpoint_path, or log_to_wandb (then the
            folders only go to wandb, as in SAELens).
        keep_checkpoints: how many recent checkpoints to keep.
        resume: continue from the newest checkpoint in checkpoint_path when there is one.
        log_path: JSONL metrics file (default: <output_path>/metrics.jsonl when output_path is set).
        log_every_n_steps: metrics are fetched, logged and shown this often.
        eval_every_n_steps: run the evaluator given to `Trainer.fit` this often (0: only at the end).
        log_to_wandb, wandb_project, run_name: optional Weights & Biases logging (with SAELens' artifacts of
            the saved folders and its feature-density and decoder-norm histograms every feature_sampling_window).
        log_weights_to_wandb: the artifacts hold sae_weights.safetensors too (SAELens' default), else cfg.json only.
        on_nonfinite: "error" stops on a batch with NaN/inf; "skip" leaves the parameters untouched,
            counts it and goes on. Either way parameters never take a non-finite update.
        n_devices: devices of the mesh (None: all).
        model_axis_size: devices each SAE's latents are split over (feature sharding, for SAEs wider than
            one device): the mesh becomes (data = n_devices // model_axis_size, model = model_axis_size),
            W_enc / W_dec / the per-latent vectors and their Adam moments are sharded over `model`, and
            the batch over `data`. 1: every device holds the whole SAE (data parallel only). Must
            divide d_sae and the device count; with several processes, each process's device count.
        sweep_strategy: how the SAEs of a sweep share a step: "vmap" (batched together), "unroll" (each
            member's step written out in the same compiled step), "map" (a loop over the members in it)
            or "auto" (the execution plan's choice, `jsae.backends.resolve_strategy`).
        adam_implementation: "auto": the execution plan may take a back end's fused update (on CPU
            with float32 parameters, one in-place pass over each parameter; the values optax gives,
            up to float rounding); "optax": optax's transformations everywhere.
        compute_dtype: the dtype of the training products' inputs, "float32" or "bfloat16" (SAELens'
            `autocast: true`); products accumulate in float32 and everything else (losses, Adam) runs in
            the parameters' `sae.dtype`. bfloat16 needs an architecture whose forward runs its products
            on the plan's primitives (topk, standard, jumprelu).
        matmul_precision: XLA's precision for float32 products: "default" (XLA's: TF32 on recent NVIDIA
            GPUs), "tf32", or "float32" / "highest" (full float32).
        sync_every_n_steps: wait for the device every n steps (None: every step on multi-device CPU,
            where XLA's collectives otherwise deadlock, else never).
        progress_bar: show a tqdm bar.
    """

    sae: SAEConfig
    total_training_tokens: int
    train_batch_size_tokens: int = 4096
    lr: float = 3e-4
    lr_end: float | None = None
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    n_restart_cycles: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    n_batches_for_norm_estimate: int = 1000
    seed: int = 42
    output_path: str | None = None
    checkpoint_path: str | None = None
    checkpoint_every_n_steps: int = 0
    n_checkpoints: int = 0
    keep_checkpoints: int = 3
    resume: bool = True
    log_path: str | None = None
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 0
    log_to_wandb: bool = False
    log_weights_to_wandb: bool = True
    wandb_project: str = "jsae"
    run_name: str | None = None
    on_nonfinite: str = "error"
    n_devices: int | None = None
    model_axis_size: int = 1
    sync_every_n_steps: int | None = None
    sweep_strategy: str = "auto"
    adam_implementation: str = "auto"
    compute_dtype: str = "float32"
    matmul_precision: str = "default"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        get_training_architecture(self.sae.architecture, where="TrainConfig.sae.architecture")
        if not hasattr(self.sae, "coefficients"):
            raise ConfigError(
                f"TrainConfig.sae must be a training config (e.g. {type(self.sae).__name__.replace('SAE', 'TrainingSAE')}), "
                f"got {type(self.sae).__name__}."
            )
        for field in dataclasses.fields(self):  # a flag, name or path of another type would be misread later
            value, kind = getattr(self, field.name), str(field.type)
            if kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"TrainConfig.{field.name} must be true or false, got {value!r}.")
            if kind in ("str", "str | None") and not (isinstance(value, str | os.PathLike)
                                                       or (value is None and "None" in kind)):
                raise ConfigError(f"TrainConfig.{field.name} must be a string{' or null' if 'None' in kind else ''}, "
                                  f"got {value!r}.")
        positive = ("total_training_tokens", "train_batch_size_tokens", "dead_feature_window",
                    "feature_sampling_window", "log_every_n_steps", "keep_checkpoints", "model_axis_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}.")
        nonnegative = ("lr_warm_up_steps", "lr_decay_steps", "checkpoint_every_n_steps",
                       "n_batches_for_norm_estimate", "n_checkpoints", "eval_every_n_steps")
        for name in nonnegative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}.")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr!r}.")
        if self.lr == float("inf"):
            raise ConfigError(f"TrainConfig.lr must be finite, got {self.lr!r}.")
        if self.lr_end is not None and not 0 <= self.lr_end < float("inf"):
            raise ConfigError(f"TrainConfig.lr_end must be >= 0, got {self.lr_end!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"TrainConfig.max_grad_norm must be > 0, got {self.max_grad_norm!r}.")
        if self.adam_implementation not in ("auto", "optax"):
            raise ConfigError(f"TrainConfig.adam_implementation must be one of ['auto', 'optax'], "
                              f"got {self.adam_implementation!r}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"TrainConfig.compute_dtype must be one of {list(COMPUTE_DTYPES)}, "
                              f"got {self.compute_dtype!r}.")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"TrainConfig.matmul_precision must be one of {list(MATMUL_PRECISIONS)}, "
                              f"got {self.matmul_precision!r}.")
        if self.compute_dtype != "float32" and not get_training_architecture(self.sae.architecture).mixed_precision:
            raise ConfigError(
                f"TrainConfig.compute_dtype={self.compute_dtype!r}: architecture {self.sae.architecture!r} does not "
                "run its products on the plan's primitives; use compute_dtype 'float32' (or topk, standard, jumprelu)."
            )
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(
                f"TrainConfig.on_nonfinite must be one of {list(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}."
            )
        if self.n_checkpoints and self.checkpoint_path is None and not self.log_to_wandb:
            raise ConfigError(f"TrainConfig.n_checkpoints={self.n_checkpoints} writes SAE folders under checkpoint_path, "
                              "which is null (and log_to_wandb is off); set checkpoint_path or n_checkpoints: 0.")
        if self.total_training_steps < 1:
            raise ConfigError(
                f"TrainConfig.total_training_tokens ({self.total_training_tokens}) is less than one batch "
                f"(train_batch_size_tokens={self.train_batch_size_tokens})."
            )
        sync = self.sync_every_n_steps
        if sync is not None and (isinstance(sync, bool) or not isinstance(sync, int) or sync < 1):
            raise ConfigError(f"TrainConfig.sync_every_n_steps must be a positive integer or null, got {sync!r}.")
        if self.n_devices is not None and (not isinstance(self.n_devices, int) or self.n_devices < 1):
            raise ConfigError(f"TrainConfig.n_devices must be a positive integer or null, got {self.n_devices!r}.")
        if self.sae.d_sae % self.model_axis_size:
            raise ConfigError(
                f"TrainConfig.model_axis_size={self.model_axis_size} does not divide d_sae={self.sae.d_sae}: the "
                "latents are split evenly over the model axis; choose a divisor of d_sae."
            )
        if self.n_devices is not None and self.n_devices % self.model_axis_size:
            raise ConfigError(
                f"TrainConfig.model_axis_size={self.model_axis_size} does not divide n_devices={self.n_devices}: "
                "the mesh is (n_devices // model_axis_size, model_axis_size); choose a divisor of n_devices."
            )
        if self.sweep_strategy not in SWEEP_STRATEGIES:
            raise ConfigError("TrainConfig.sweep_strategy must be 'auto', 'vmap', 'unroll' or 'map', "
                              f"got {self.sweep_strategy!r}.")
        self.lr_schedule()  # validates scheduler name and step counts

    @property
    def total_training_steps(self) -> int:
        return self.total_training_tokens // self.train_batch_size_tokens

    def lr_schedule(self):
        """step -> lr (`jsae.training.schedules.lr_at` of `lr_schedule_params`)."""
        from jsae.training.schedules import lr_at

        params = self.lr_schedule_params()
        return lambda step: lr_at(step, params)

    def lr_schedule_params(self):
        """The learning-rate schedule as data (`jsae.training.schedules.LRSchedule`)."""
        from jsae.training.schedules import lr_schedule_params

        try:
            return lr_schedule_params(
                lr=self.lr, total_steps=self.total_training_steps, scheduler=self.lr_scheduler_name,
                warm_up_steps=self.lr_warm_up_steps, decay_steps=self.lr_decay_steps, lr_end=self.lr_end,
                n_restart_cycles=self.n_restart_cycles,
            )
        except ConfigError as err:
            raise ConfigError(f"TrainConfig: {err}") from err

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sae"] = self.sae.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
        """Build from plain data (e.g. YAML): `sae` holds the SAE fields with its `architecture`."""
        data = dict(data)
        if "sae" not in data:
            raise ConfigError(f"{where}: missing the 'sae' section (architecture, d_in, d_sae, ...).")
        sae = data.pop("sae")
        if isinstance(sae, Mapping):
            sae = dict(sae)
            arch = get_training_architecture(sae.pop("architecture", "standard"), where=f"{where}.sae.architecture")
            sae = dataclass_from_dict(arch.config_cls, sae, where=f"{where}.sae")
        elif not isinstance(sae, SAEConfig):
            raise ConfigError(f"{where}: the 'sae' section must be a mapping of SAE fields (architecture, d_in, d_sae, "
                              f"...), got {sae!r}.")
        data["sae"] = sae
        return dataclass_from_dict(cls, data, where=where)
