"""`--dry-run`: everything a run checks before its first step, without the run.

The config is validated, the model loaded and its hook(s) checked against the SAE's width, one
token row read from the dataset, and every path the run writes checked: a folder where a folder
goes, a place it may write. Nothing is trained and nothing is left behind (a writability probe
is a temporary folder, removed at once). Each check raises the run's own error naming the field.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from jsae import ConfigError, InputError, JsaeError

if TYPE_CHECKING:
    from bridge.run_config import RunConfig


def check_folder(path: str | os.PathLike, field: str) -> str:
    """Checks that a folder can be at `path` and written in; returns "exists" or "will be created".

    Raises ConfigError naming `field` when `path` or one of its parents is a file, or when the
    nearest existing folder cannot be written in.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {path} is a file; a folder goes there.")
    return _check_writable_parent(path, field, "exists" if path.exists() else "will be created")


def check_file(path: str | os.PathLike, field: str) -> str:
    """Checks that a file can be written at `path`; returns "exists" or "will be created"."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{field}: {path} is a folder; a file goes there.")
    state = "exists" if path.exists() else "will be created"
    _check_writable_parent(path.parent, field, state)
    return state


def check_absent(path: str | os.PathLike, field: str) -> str:
    """Checks that nothing is at `path` yet (a cache is built whole, never into an existing folder)."""
    path = Path(path).expanduser()
    if path.exists():
        raise ConfigError(f"{field}: {path} already exists; remove it or choose another path.")
    return check_folder(path, field)


def _check_writable_parent(path: Path, field: str, state: str) -> str:
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: {existing} is a file, so {path} cannot be created under it.")
    try:  # os.access is not enough: read-only mounts and ACLs answer only to a real write
        with tempfile.TemporaryDirectory(prefix=".jsae-dry-run-", dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{field}: cannot write in {existing} ({err.strerror or err}).") from err
    return state


def check_first_row(cfg: RunConfig, model, *, split: str | None = None) -> list[int]:
    """One token row of the dataset (and no more), or the error that names dataset_path."""
    from bridge.data import token_rows

    try:
        return next(token_rows(cfg, model, split=split, cycle=False))
    except JsaeError:
        raise
    except StopIteration:
        raise InputError(f"dataset_path: {cfg.dataset_path!r} gave no row of context_size={cfg.context_size}.") from None
    except Exception as err:  # the datasets library's many errors: name the field the user can fix
        raise InputError(f"dataset_path: cannot read {cfg.dataset_path!r} ({type(err).__name__}: {err}).") from err


def output_checks(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(field, path, state) of every path a training run writes, each checked."""
    train = cfg.train
    log_path = train.log_path or (os.path.join(train.output_path, "metrics.jsonl") if train.output_path else None)
    checks = []
    for field, path, check, unset in (("output_path", train.output_path, check_folder, "null: the SAE is not saved"),
                                      ("checkpoint_path", train.checkpoint_path, check_folder, "null: no checkpoints"),
                                      ("log_path", log_path, check_file, "null: no metrics file")):
        checks.append((field, path, unset) if path is None else (field, path, check(path, field)))
    return checks


def check_cache(cfg: RunConfig, width: int, model=None) -> str:
    """The report's line on `activation_cache_path`. A cache not written yet is reported, not refused
    (`jsae cache` may be the step before); one that exists must be finished and hold every hook at `width`."""
    from bridge.saelens_cache import cache_format, cached_activations

    field = "activation_cache_path" if cfg.activation_cache_path is not None else "cached_activations_path"
    path = Path(cfg.activations_cache).expanduser()
    if not path.exists():
        return (f"{field}: {cfg.activations_cache} does not exist yet; write it with `jsae cache` "
                "before training (training would fail now)")
    for hook in cfg.hooks:
        cached = cached_activations(cfg, hook, model)
        if cached.d_in != width:
            raise ConfigError(f"{field}: {path} holds {hook!r} with width {cached.d_in}, not sae.d_in={width}.")
    return f"{field}: {cfg.activations_cache} (a finished {cache_format(path)} cache of {', '.join(cfg.hooks)})"


def dry_run_train(cfg: RunConfig, *, cache_path: str | None = None) -> list[str]:
    """The checks of `jsae train` (or, with `cache_path`, of `jsae cache`): the report's lines.

    Raises the error the run would raise, naming the field at fault.
    """
    from bridge.model import hook_width
    from bridge.run import prepare, run_members

    model, cfg = prepare(cfg)  # validates the config; loads the model; checks hooks, widths and n_ctx
    members, _, _ = run_members(cfg)
    width = hook_width(model, cfg.hooks[0], cfg.hook_head_index)
    lines = [f"model: {cfg.model_name}, {'hooks' if cfg.hook_names else 'hook'} {', '.join(cfg.hooks)} "
             f"(width {width} = sae.d_in)"]
    if cfg.hook_name_out is not None:  # (prepare checked its width)
        lines.append(f"target: hook_name_out {cfg.hook_name_out} (width {cfg.train.sae.d_out} = sae.d_out)")
    if cfg.activations_cache is not None and cache_path is None:
        lines.append(check_cache(cfg, width, model))
    row = check_first_row(cfg, model)
    lines.append(f"dataset: {cfg.dataset_path} (split {cfg.dataset_split}): read a first row of {len(row)} tokens")
    if cfg.eval_dataset_path is not None and cfg.n_eval_batches:
        from bridge.data import eval_data_config, heldout_split

        eval_cfg = eval_data_config(cfg)
        row = check_first_row(eval_cfg, model, split=heldout_split(eval_cfg))
        lines.append(f"eval_dataset_path: {cfg.eval_dataset_path}: read a first row of {len(row)} tokens")
    if cache_path is not None:
        lines.append(f"activation_cache_path: {cache_path} ({check_absent(cache_path, 'activation_cache_path')})")
    else:
        train = cfg.train
        lines.append(f"SAEs: {len(members)} ({train.sae.architecture} {train.sae.d_in} -> {train.sae.d_sae}), "
                     f"{train.total_training_steps:,} steps of {train.train_batch_size_tokens:,} tokens")
        lines += [f"{field}: {path or '-'} ({state})" for field, path, state in output_checks(cfg)]
    return lines


def dry_run_eval(sae, cfg: RunConfig) -> list[str]:
    """The checks of `jsae eval`: the report's lines."""
    from bridge.data import heldout_split
    from bridge.eval_run import load_eval_model

    model = load_eval_model(sae, cfg)  # the hook exists, with the SAE's width; context_size fits
    split = heldout_split(cfg)
    row = check_first_row(cfg, model, split=split)
    return [f"model: {cfg.model_name}, hook {cfg.hook_name} (width {sae.cfg.d_in} = the SAE's d_in)",
            f"dataset: {cfg.dataset_path} (split {split}): read a first row of {len(row)} tokens"]
