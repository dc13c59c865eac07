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


def build(src: Source, cfg_dict: Mapping[str, Any], params: Mapping[str, np.ndarray], *, source: str) -> Converted:
    """The Converted for a cfg dict built as SAELens' config getter builds it, and SAELens-named params.

    `cfg_dict` goes through the same upgrade SAELens applies to loaded configs (a dict without
    sae_lens_version is upgraded as a pre-6.0 config: top-level model / hook facts move into
    metadata, `activation_fn: topk` becomes architecture topk); the release's overrides, the
    requested dtype among them, apply last, as in SAELens. Params are checked against the
    architecture's shapes and cast to the config's dtype.
    """
    from jsae.cfg_json import config_from_dict
    from jsae.tensors import cast_params, check_params, check_tensor_dtypes

    check_tensor_dtypes(params, source=source)
    cfg = config_from_dict(cfg_dict, source=source, overrides=src.overrides)
    check_params(params, cfg, source=source)
    return Converted(cfg, cast_params(params, cfg.dtype, source=source))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; FormatError otherwise."""
    from jsae._errors import FormatError
    from jsae.cfg_json import describe_json, read_json

    raw = read_json(path)
    if not isinstance(raw, Mapping):
        raise FormatError(f"{path}: expected a JSON object, found {describe_json(raw)}.")
    return dict(raw)


def require(mapping: Mapping[str, Any], keys: tuple[str, ...], *, source: Any, what: str = "key") -> None:
    """FormatError naming the first of `keys` missing from `mapping` (a config or a state dict)."""
    from jsae._errors import FormatError

    for key in keys:
        if key not in mapping:
            raise FormatError(f"{source}: missing {what} {key!r} (found {sorted(mapping)}).")
