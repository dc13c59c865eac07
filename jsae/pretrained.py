"""Released SAEs: resolve a (release, sae_id) through SAELens' registry and fetch it from the Hub.

The registry is SAELens' own `pretrained_saes.yaml`, read from an installed sae_lens without
importing it (or torch); a built-in copy of the seed releases is used first and when sae_lens
is absent. Files come from `huggingface_hub.hf_hub_download`, so its cache and HF_HUB_OFFLINE
apply unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from jsae import converters
from jsae._errors import ConfigError, MissingFileError, close_names
from jsae.config import SAEConfig
from jsae.converters import saelens as saelens_converters

BUILTIN_REGISTRY = Path(__file__).with_name("pretrained_saes.yaml")
#: Names users write for registry releases (the SAELens README's `gemma-2b-res`).
RELEASE_ALIASES = {"gemma-2b-res": "gemma-2b-res-jb"}


@dataclasses.dataclass(frozen=True)
class Release:
    """One registry release."""

    name: str
    repo_id: str
    model: str | None
    conversion_func: str | None
    saes: dict[str, dict[str, Any]]  # sae id -> {path, l0, neuronpedia, norm_scaling_factor, ...}
    config_overrides: dict[str, Any]


def _load_yaml(path: Path) -> dict[str, Release]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as f:
        data = yaml.load(f, Loader=loader) or {}
    return {
        name: Release(
            name=name,
            repo_id=entry["repo_id"],
            model=entry.get("model"),
            conversion_func=entry.get("conversion_func"),
            saes={str(s["id"]): s for s in entry.get("saes", [])},
            config_overrides=dict(entry.get("config_overrides") or {}),
        )
        for name, entry in data.items()
    }


@functools.cache
def builtin_registry() -> dict[str, Release]:
    return _load_yaml(BUILTIN_REGISTRY)


def saelens_registry_path() -> Path | None:
    """sae_lens' pretrained_saes.yaml, located without importing sae_lens."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    return path if path.is_file() else None


@functools.cache
def saelens_registry() -> dict[str, Release]:
    path = saelens_registry_path()
    return _load_yaml(path) if path is not None else {}


def get_release(name: str) -> Release | None:
    name = RELEASE_ALIASES.get(name, name)
    return builtin_registry().get(name) or saelens_registry().get(name)


def known_releases() -> list[str]:
    return sorted(set(builtin_registry()) | set(saelens_registry()) | set(RELEASE_ALIASES))


def resolve(release: str, sae_id: str) -> tuple[str, str, str, dict[str, Any], float | None]:
    """(repo_id, folder, converter, config_overrides, norm_scaling_factor) for a release + id."""
    entry = get_release(release)
    if entry is None:
        if "/" in release:
            return release, sae_id, "auto", {}, None
        raise ConfigError(
            f"release: unknown release {release!r} (not in the SAELens registry, and not an "
            f"'owner/repo' Hub id)." + close_names(release, known_releases(), n=5)
        )
    if sae_id not in entry.saes:
        ids = list(entry.saes)
        shown = ids[:8] + (["..."] if len(ids) > 8 else [])
        raise ConfigError(
            f"sae_id: {sae_id!r} is not in release {entry.name!r}; its ids are {shown}." + close_names(sae_id, ids)
        )
    info = entry.saes[sae_id]
    overrides = dict(entry.config_overrides)
    if info.get("neuronpedia") is not None:
        overrides["neuronpedia_id"] = info["neuronpedia"]
    converter = entry.conversion_func or "sae_lens"
    converters.get_converter(converter, release=entry.name)  # fail before any download
    return entry.repo_id, str(info["path"]), converter, overrides, info.get("norm_scaling_factor")


def _download(repo_id: str, filename: str, *, force_download: bool, optional: bool = False) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download))
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: test it first
        if optional:
            return None
        raise MissingFileError(
            f"{repo_id}/{filename}: not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE set): {err}"
        ) from None
    except EntryNotFoundError:
        if optional:
            return None
        raise MissingFileError(f"{repo_id}/{filename}: the Hub repository has no such file.") from None


def load(
    release: str, sae_id: str, *, dtype: str = "float32", force_download: bool = False
) -> tuple[SAEConfig, dict[str, np.ndarray], np.ndarray | None, float | None]:
    """Fetch a released SAE: (config, params, log10 sparsity or None, norm_scaling_factor)."""
    repo_id, folder, converter, overrides, norm_scaling_factor = resolve(release, sae_id)

    def fetch(path: str, optional: bool = False) -> Path | None:
        return _download(repo_id, path, force_download=force_download, optional=optional)

    src = converters.Source(
        release=release,
        sae_id=sae_id,
        repo_id=repo_id,
        folder=folder,
        overrides=overrides | {"dtype": dtype},
        dtype=dtype,
        fetch=fetch,
    )
    if converter == "auto":
        converter = saelens_converters.detect_hub_format(src)
    out = converters.get_converter(converter, release=release)(src)
    return out.cfg, out.params, out.sparsity, norm_scaling_factor


