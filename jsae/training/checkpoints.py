"""A run's orbax checkpoints: the whole TrainState plus where the data stood, and the run's fingerprint.

A checkpoint is written at a step number that equals the batches consumed, so a resumed run skips
exactly those batches and ends bitwise like an uninterrupted one. Resuming refuses a checkpoint
whose fingerprint (every config field that decides the result, the activations' source included)
differs, naming each changed field.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax

from jsae._errors import ConfigError

# Fields that do not decide the result: where files go, how progress shows, how often things happen,
# and how the work is spread over devices (orbax reshards, so a run may resume on another mesh).
NOT_FINGERPRINTED = frozenset({
    "output_path", "checkpoint_path", "log_path", "progress_bar", "resume", "log_to_wandb", "wandb_project",
    "run_name", "log_every_n_steps", "eval_every_n_steps", "checkpoint_every_n_steps", "keep_checkpoints",
    "sync_every_n_steps", "model_axis_size", "sweep_strategy", "n_checkpoints", "log_weights_to_wandb",
})
# Metadata that describes the result rather than deciding it.
METADATA_NOT_FINGERPRINTED = frozenset({"eval_metrics", "l0", "num_dead_features", "jsae_version", "jsae_execution"})


def _config_data(cfg) -> dict:
    data = {k: v for k, v in cfg.to_dict().items() if k not in NOT_FINGERPRINTED}
    sae = dict(data["sae"])
    sae["metadata"] = {k: v for k, v in dict(sae.get("metadata") or {}).items() if k not in METADATA_NOT_FINGERPRINTED}
    data["sae"] = sae
    return data


def fingerprint(cfg, sweep=None) -> dict:
    """The fields of a run (and of each sweep member) that decide its result, as JSON data. The SAE's
    metadata is included: the model, hook, dataset and packing the activations come from."""
    data = _config_data(cfg)
    if sweep is not None:
        data["sweep"] = {"names": list(sweep.names), "streams": list(sweep.streams),
                         "members": [_config_data(m) for m in sweep.members]}
    return json.loads(json.dumps(data, default=str))


def changed_fields(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two fingerprints (e.g. "sae.k", "sae.metadata.hook_name")."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += changed_fields(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [prefix.rstrip(".") or "(config)"]


class Checkpoints:
    """The checkpoint folder of one run (orbax CheckpointManager, written synchronously).

    Args:
        path: the folder.
        keep: how many recent checkpoints to keep.
        fingerprint: the run's `fingerprint`, stored with every checkpoint and compared on restore.
    """

    def __init__(self, path: str | Path, *, keep: int, fingerprint: dict):
        import orbax.checkpoint as ocp

        self.path = Path(path).absolute()
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.path, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any, *, batches_consumed: int, norm_batches: int, step: int) -> None:
        """Write `state` at step `batches_consumed` (a no-op where that step is already written)."""
        import orbax.checkpoint as ocp

        if batches_consumed in self.manager.all_steps():
            return
        meta = {"batches_consumed": batches_consumed, "norm_batches": norm_batches, "step": step,
                "config": self.fingerprint}
        self.manager.save(batches_consumed, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                    meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, template: Any, shardings: Any) -> tuple[Any, dict] | None:
        """The newest intact checkpoint as (state laid out like `shardings`, meta), None where there is none.

        A checkpoint that cannot be read (cut short, files deleted) is passed over, with a warning,
        for the one before it; if none can be read, a ConfigError says so.
        """
        import orbax.checkpoint as ocp

        steps = self.steps()
        if not steps:
            return None
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, shardings)
        failures = []
        for step in reversed(steps):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is passed over
                failures.append(f"step {step}: {type(error).__name__}: {str(error)[:200]}")
                continue
            self.check_same_run(meta)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001
                failures.append(f"step {step}: {type(error).__name__}: {str(error)[:200]}")
                continue
            if failures:
                warnings.warn(f"checkpoint_path {self.path}: the newest checkpoint(s) could not be read "
                              f"({'; '.join(failures)}); resuming from step {step}.", RuntimeWarning, stacklevel=3)
            return restored["state"], restored["meta"]
        raise ConfigError(f"checkpoint_path {self.path}: none of its checkpoints (steps {steps}) can be read "
                          f"({'; '.join(failures)}); delete the folder to start afresh, or choose another "
                          "checkpoint_path.")

    def check_same_run(self, meta: dict) -> None:
        saved = meta.get("config")
        if saved is not None and saved != self.fingerprint:
            changed = changed_fields(saved, self.fingerprint)
            raise ConfigError(
                f"checkpoint_path {self.path} holds a run with a different config (changed: {', '.join(changed)}); "
                "use another checkpoint_path, delete it, or set resume: false."
            )

    def close(self) -> None:
        self.manager.close()
