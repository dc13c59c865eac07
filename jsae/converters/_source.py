"""What a converter receives (one released SAE's files and registry facts) and what it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jsae.config import SAEConfig


@dataclasses.dataclass(frozen=True)
class Source:
    """One released SAE as SAELens' loaders see it.

    Attributes:
        release: registry release name (or an 'owner/repo' Hub id).
        sae_id: the SAE's id in the release.
        repo_id: Hub repository holding its files.
        folder: the registry's `path` for the SAE (SAELens' `folder_name`): a folder in the
            repository for most formats, a single file for some (`*.pt` checkpoints).
        overrides: SAELens' cfg overrides: the release's `config_overrides`, the SAE's
            neuronpedia id, and the requested `dtype` (SAELens' loaders receive it the same way).
        dtype: the requested parameter dtype.
        fetch: downloads a path in the repository (through huggingface_hub, so its cache and
            HF_HUB_OFFLINE apply); returns the local file, or None when `optional` and missing.
    """

    release: str
    sae_id: str
    repo_id: str
    folder: str
    overrides: Mapping[str, Any]
    dtype: str
    fetch: Callable[..., Path | None]

    def file(self, name: str, *, optional: bool = False) -> Path | None:
        """`name` inside the SAE's folder (`folder/name`), downloaded."""
        folder = self.folder.strip("/")
        return self.fetch(f"{folder}/{name}" if folder else name, optional=optional)

    def repo_file(self, path: str, *, optional: bool = False) -> Path | None:
        """`path` from the repository root, downloaded."""
        return self.fetch(path, optional=optional)


@dataclasses.dataclass(frozen=True)
class Converted:
    """A converter's result: the config, params named as SAELens names them, optional log10 sparsity."""

    cfg: SAEConfig
    params: dict[str, np.ndarray]
    sparsity: np.ndarray | None = None
