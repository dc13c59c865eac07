"""SAELens SAE folders written during a run (n_checkpoints), and what SAELens sends to wandb:
each folder as an artifact, feature-density and decoder-norm histograms.

When (sae_lens/training/sae_trainer.py): thresholds at
`range(0, total_training_tokens, ceil(total_training_tokens / (n_checkpoints + 1)))[1:]`; a folder is
written after the first step whose tokens seen exceed the next threshold (one threshold per step),
named by those tokens. Where: `<checkpoint_path>/saes/<tokens>/[<sweep member>/]`, each written as
the final save writes it (`SAE.save_model`: built under a temporary name beside it, then renamed, so a
folder is there whole or not at all), beside the orbax state of the same step, which is saved then
too, so each folder's step can be resumed. The folders sit under `saes/` because orbax takes every
integer-named folder of checkpoint_path for one of its own steps. Without checkpoint_path and with
wandb on, the folders go to a temporary folder, only to be sent as artifacts (as SAELens does).

wandb (sae_lens.config.LoggingConfig.log): an artifact `sae_<model_name>_<hook_name>_<d_sae>` of type
"model" holding cfg.json (and sae_weights.safetensors when log_weights_to_wandb), and
`<that>_log_feature_sparsity` holding sparsity.safetensors; the final folder's carry the alias
"final_model". Every feature_sampling_window steps: metrics/mean_log10_feature_sparsity,
plots/feature_density_line_chart (a histogram of log10 feature density), sparsity/below_1e-5,
sparsity/below_1e-6 and weights/W_dec_norms (a histogram), as SAELens logs them; a sweep prefixes
each member's with "<name>/".
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jsae.training.hooks import Hook, StepInfo

FOLDERS = "saes"  # under checkpoint_path


def checkpoint_steps(total_tokens: int, batch_tokens: int, total_steps: int, n_checkpoints: int) -> dict[int, int]:
    """{step: tokens seen after it} of the steps after which SAELens' trainer writes its n_checkpoints
    folders (those within the run's `total_steps`)."""
    if n_checkpoints <= 0:
        return {}
    thresholds = list(range(0, total_tokens, math.ceil(total_tokens / (n_checkpoints + 1))))[1:]
    steps, step = {}, 0
    for threshold in thresholds:
        step = max(step + 1, threshold // batch_tokens + 1)  # the first step whose tokens exceed it
        if step > total_steps:
            break
        steps[step] = step * batch_tokens
    return steps


def artifact_name(sae, member: str | None = None) -> str:
    """SAELens' `TrainingSAE.get_name()` with "/" as "__" (and a sweep member's name), in the characters
    wandb takes for an artifact name."""
    meta = sae.cfg.metadata
    name = f"sae_{getattr(meta, 'model_name', None)}_{getattr(meta, 'hook_name', None)}_{sae.cfg.d_sae}"
    if member:
        name += f"_{member}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("/", "__"))


def log_artifacts(run, folder: Path, sae, cfg, *, member: str | None = None, aliases: list[str] | None = None) -> None:
    """Send a saved SAE folder to wandb as SAELens does (see the module docstring)."""
    import wandb

    from jsae.io import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME

    name, metadata = artifact_name(sae, member), cfg.to_dict()
    model = wandb.Artifact(name, type="model", metadata=metadata)
    if cfg.log_weights_to_wandb:
        model.add_file(str(folder / WEIGHTS_FILENAME))
    model.add_file(str(folder / CFG_FILENAME))  # add_file copies into wandb's staging area at once
    run.log_artifact(model, aliases=aliases)
    sparsity = wandb.Artifact(f"{name}_log_feature_sparsity", type="log_feature_sparsity", metadata=metadata)
    if (folder / SPARSITY_FILENAME).is_file():
        sparsity.add_file(str(folder / SPARSITY_FILENAME))
    run.log_artifact(sparsity)


class SAEFolders:
    """The n_checkpoints hook: SAELens folders of the SAEs at SAELens' checkpoint steps (and the orbax
    state of those steps through `save_state`), sent to wandb when it is on.

    Args:
        trainer: the `jsae.Trainer` (its SAEs as saved, their names, whether this process writes).
        logger: the run's `MetricsLogger` (its wandb run, on the primary process).
        save_state: writes the orbax checkpoint of a step (None: no checkpoint_path).
    """

    def __init__(self, trainer, logger, save_state=None):
        cfg = trainer.cfg
        self.trainer, self.logger, self.save_state = trainer, logger, save_state
        self.steps = checkpoint_steps(cfg.total_training_tokens, cfg.train_batch_size_tokens,
                                      cfg.total_training_steps, cfg.n_checkpoints)

    def __call__(self, info: StepInfo) -> None:
        if info.step not in self.steps:
            return
        if self.save_state is not None:
            self.save_state(info)
        saes = self.trainer._saes(info.state)  # every process: a collective when latents span processes
        run = self.logger.wandb
        if not self.trainer.is_primary or (self.trainer.cfg.checkpoint_path is None and run is None):
            return
        with tempfile.TemporaryDirectory(prefix="jsae-sae-checkpoint-") as tmp:
            base = Path(self.trainer.cfg.checkpoint_path or tmp) / FOLDERS / str(self.steps[info.step])
            for name, sae in zip(self.trainer._names(), saes, strict=True):
                folder = base if name is None else base / name
                sae.save_model(folder)
                if run is not None:
                    log_artifacts(run, folder, sae, self.trainer.cfg, member=name)


def log_final_artifacts(trainer, logger, saes: list) -> None:
    """The final folders (written to output_path) as wandb artifacts with the alias "final_model"."""
    cfg = trainer.cfg
    if logger.wandb is None or cfg.output_path is None:
        return
    for name, sae in zip(trainer._names(), saes, strict=True):
        folder = Path(cfg.output_path) if name is None else Path(cfg.output_path) / name
        log_artifacts(logger.wandb, folder, sae, cfg, member=name, aliases=["final_model"])


def histogram_values(trainer, state: Any) -> dict[str, Any]:
    """SAELens' sparsity-window log of each SAE of `state` (see the module docstring), as numbers and
    numpy arrays ("plots/..." and "weights/..." are the histograms' values)."""
    from jsae.training.sweep import member_state

    host = trainer._to_host(state.replace(opt_state=None))
    members = [host] if trainer.sweep is None else [member_state(host, i) for i in range(len(trainer.sweep.members))]
    values = {}
    for name, member in zip(trainer._names(), members, strict=True):
        density = np.asarray(member.act_freq, np.float64) / max(float(member.window_tokens), 1.0)
        log_density = np.log10(density + 1e-10)
        prefix = "" if name is None else f"{name}/"
        values |= {
            f"{prefix}metrics/mean_log10_feature_sparsity": float(log_density.mean()),
            f"{prefix}plots/feature_density_line_chart": log_density,
            f"{prefix}sparsity/below_1e-5": int((density < 1e-5).sum()),
            f"{prefix}sparsity/below_1e-6": int((density < 1e-6).sum()),
            f"{prefix}weights/W_dec_norms": np.linalg.norm(np.asarray(member.params["W_dec"], np.float32), axis=1),
        }
    return values


class WandbHistograms:
    """Logs `histogram_values` to wandb after each full feature_sampling_window (every process computes,
    since gathering split latents is a collective; the primary logs)."""

    def __init__(self, trainer, logger):
        self.trainer, self.logger = trainer, logger

    def __call__(self, info: StepInfo) -> None:
        values = histogram_values(self.trainer, info.state)
        if self.logger.wandb is None:
            return
        import wandb

        self.logger.wandb.log({k: wandb.Histogram(v) if isinstance(v, np.ndarray) else v for k, v in values.items()},
                              step=info.step)


def sae_folder_hooks(trainer, logger, save_state=None) -> list[Hook]:
    """The hooks of this module a run needs: SAE folders when n_checkpoints > 0, histograms when wandb is on."""
    cfg, hooks = trainer.cfg, []
    if cfg.n_checkpoints > 0:
        hooks.append(Hook(SAEFolders(trainer, logger, save_state), 1))
    if cfg.log_to_wandb:
        hooks.append(Hook(WandbHistograms(trainer, logger), cfg.feature_sampling_window))
    return hooks
