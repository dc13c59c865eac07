"""`jsae train CONFIG.yaml`: a language model's activations in, trained SAELens folders out.

A run config (bridge.run_config) names the model, hook point(s), dataset, training settings and
an optional sweep. Every run takes the same path: the SAEs it trains are listed as members
(one SAE is the one-member case), one source feeds them all (bridge.sources), `jsae.Trainer`
trains them together, and the result is summarised (bridge.summaries).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from bridge.eval_run import make_evaluator
from bridge.run_config import RunConfig
from bridge.sources import training_batches
from bridge.summaries import sae_summary, summary_row, write_summary_table
from jsae import ConfigError
from jsae.config import Metadata


def prepare(cfg: RunConfig):
    """Load and check the model; return (model, cfg with the SAE's metadata filled in).

    Raises ConfigError when a hook is not in the model, its width is not sae.d_in, context_size
    exceeds the model's n_ctx, hook_head_index is not one of the hook's heads, or a token id the config
    names is not in the model's vocabulary.
    """
    from bridge.data import check_token_settings
    from bridge.model import check_device, hook_width, load_model, model_device

    if cfg.train is None:
        raise ConfigError("the run config has no training settings (an 'sae' section and total_training_tokens).")
    if cfg.device != "auto":
        check_device(cfg.device)
    # the device the model is on from here on (the evals' token rows, the activation cache's record)
    cfg = dataclasses.replace(cfg, device=model_device(cfg.device))
    model = load_model(cfg.model_name, model_class_name=cfg.model_class_name,
                       from_pretrained_kwargs=cfg.model_from_pretrained_kwargs, device=cfg.device)
    if cfg.context_size > model.cfg.n_ctx:
        raise ConfigError(f"context_size={cfg.context_size} is larger than the model's n_ctx={model.cfg.n_ctx}.")
    check_token_settings(cfg, model)
    sae = cfg.train.sae
    for hook in cfg.hooks:
        width = hook_width(model, hook, cfg.hook_head_index)
        if sae.d_in != width:
            field = "hook_names" if cfg.hook_names else "hook_name"
            raise ConfigError(
                f"sae.d_in={sae.d_in} contradicts the width of {hook!r} ({field}) in {cfg.model_name!r}, which is "
                f"{width}" + ("; every hook of hook_names needs the same width." if cfg.hook_names else ".")
            )
    if cfg.hook_name_out is not None and sae.d_out != hook_width(model, cfg.hook_name_out, None):
        raise ConfigError(f"sae.d_out={sae.d_out} contradicts the width of {cfg.hook_name_out!r} (hook_name_out) in "
                          f"{cfg.model_name!r}, which is {hook_width(model, cfg.hook_name_out, None)}.")
    metadata = Metadata(dict(sae.metadata) | cfg.metadata() | {"hook_name": cfg.hooks[0]})
    return model, dataclasses.replace(cfg, train=cfg.train.replace(sae=sae.replace(metadata=metadata)))


def trains_several(cfg: RunConfig) -> bool:
    """Whether the run writes one folder per SAE under output_path (several hooks or a sweep)."""
    return bool(cfg.hook_names or cfg.sweep)


def run_members(cfg: RunConfig) -> tuple[list, list[str], list[int]]:
    """The SAEs `cfg` trains: (member TrainConfigs, folder names under output_path, hook index of each).

    Members go hook by hook, sweep position by sweep position; a name is "<hook>/<sweep member>"
    with the parts that vary ("" for a run of one SAE, which is saved to output_path itself).
    """
    from jsae.training.sweep import member_name, sweep_configs

    axes = dict(cfg.sweep)
    members, names, streams = [], [], []
    for stream, hook in enumerate(cfg.hooks):
        sae_cfg = cfg.train.sae.replace(metadata=cfg.train.sae.metadata.replace(hook_name=hook))
        for i, member in enumerate(sweep_configs(cfg.train.replace(sae=sae_cfg), axes)):
            members.append(member)
            streams.append(stream)
            names.append("/".join(([hook] if cfg.hook_names else []) + ([member_name(axes, i)] if axes else [])))
    return members, names, streams


def run_sweep(cfg: RunConfig, members: list, names: list[str], streams: list[int]):
    """The `jsae.Sweep` of `run_members`' SAEs for the trainer, or None for a run of one SAE."""
    from jsae.training.sweep import Sweep

    if not trains_several(cfg):
        return None
    return Sweep(members=tuple(members), names=tuple(names), streams=tuple(streams) if cfg.hook_names else ())


def run(cfg: RunConfig):
    """Train the configured SAE(s), evaluating on held-out rows along the way.

    Returns (sae, summary dict) for one SAE; (the SAEs, a jsae.SweepResult, and a summary with one row per SAE) for a
    sweep or several hook points.
    """
    import jsae
    from bridge.dry_run import output_checks

    if cfg.train is not None:  # (prepare refuses a config without training settings)
        # every path the run writes (output_path, checkpoint_path, log_path), as --dry-run checks them: a path
        # the run cannot write fails here, before the model loads, not when the first file is written
        output_checks(cfg)
    model, cfg = prepare(cfg)
    members, names, streams = run_members(cfg)
    sweep = run_sweep(cfg, members, names, streams)
    batches = training_batches(cfg, model)
    trainer = jsae.Trainer(cfg.train, sweep=sweep)
    fitted = trainer.fit(batches, evaluator=make_evaluator(cfg, model), batch_dtype=batches_dtype(cfg))
    return summarise(cfg, fitted if sweep is not None else [fitted], members, names)


def batches_dtype(cfg: RunConfig) -> str:
    """The dtype of the batches `training_batches` yields: activations_dtype, or what the cache holds."""
    if cfg.activations_cache is not None:
        from bridge.saelens_cache import cached_dtype

        return cached_dtype(cfg)
    return cfg.activations_dtype


def summarise(cfg: RunConfig, saes: list, members: list, names: list[str]) -> tuple[Any, dict[str, Any]]:
    """`run`'s return value: (sae, its summary and plots) for one SAE, (saes, {"saes": rows, "table": path})
    for several."""
    output_path = cfg.train.output_path
    if not trains_several(cfg):
        (sae,) = saes
        summary = sae_summary(sae)
        if output_path is not None and jax.process_index() == 0:  # only process 0 writes
            from jsae.plots import write_run_plots

            summary["plots"] = [str(p) for p in write_run_plots(output_path, sae, cfg.train.log_path)]
        return sae, summary
    axes = list(cfg.sweep)
    rows = [summary_row(name, member, sae, axes) for name, member, sae in zip(names, members, saes, strict=True)]
    summary: dict[str, Any] = {"saes": rows}
    if output_path is not None and jax.process_index() == 0:
        summary["table"] = str(write_summary_table(output_path, rows, axes))
    return saes, summary
