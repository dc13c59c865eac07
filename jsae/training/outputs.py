"""Checks, before the first step, that every path a run will write can be written."""

from __future__ import annotations

import os
from pathlib import Path

from jsae._errors import ConfigError


def _check_folder(field: str, path: str | os.PathLike) -> None:
    """`path` is or can become a writable folder: no file in its place or above it, its nearest
    existing ancestor writable."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"TrainConfig.{field}: {path} is a file, not a folder; choose another {field}.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"TrainConfig.{field}: {path} lies under {existing}, which is a file; choose another {field}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"TrainConfig.{field}: {existing} is not writable, so {path} cannot be written; choose "
                          f"another {field} or fix the folder's permissions.")


def check_writable(cfg) -> None:
    """Raise a ConfigError naming the field where output_path, checkpoint_path or log_path cannot be written."""
    for field in ("output_path", "checkpoint_path"):
        if getattr(cfg, field) is not None:
            _check_folder(field, getattr(cfg, field))
    if cfg.log_path is not None:
        log = Path(cfg.log_path).absolute()
        if log.is_dir():
            raise ConfigError(f"TrainConfig.log_path: {log} is a folder; give a file path (e.g. {log / 'metrics.jsonl'}).")
        _check_folder("log_path", log.parent)
