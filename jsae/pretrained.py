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
import re
from pathlib import Path
from typing import Any

import numpy as np

from jsae import io
from jsae._errors import ConfigError, MissingFileError, close_names
from jsae.config import SAEConfig

BUILTIN_REGISTRY = Path(__file__).with_name("pretrained_saes.yaml")
#: Names users write for registry releases (the SAELens README's `gemma-2b-res`).
RELEASE_ALIASES = {"gemma-2b-res": "gemma-2b-res-jb"}
SUPPORTED_CONVERTERS = ("sae_lens", "sparsify", "gemma_2")


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
    if converter not in SUPPORTED_CONVERTERS:
        raise ConfigError(
            f"release {entry.name!r} needs SAELens' {converter!r} converter, which jsae does not "
            f"implement yet (jsae converts {list(SUPPORTED_CONVERTERS)})."
        )
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


def _path_in_repo(folder: str, filename: str) -> str:
    folder = folder.strip("/")
    return f"{folder}/{filename}" if folder else filename


def load(
    release: str, sae_id: str, *, dtype: str = "float32", force_download: bool = False
) -> tuple[SAEConfig, dict[str, np.ndarray], np.ndarray | None, float | None]:
    """Fetch a released SAE: (config, params, log10 sparsity or None, norm_scaling_factor)."""
    repo_id, folder, converter, overrides, norm_scaling_factor = resolve(release, sae_id)

    def fetch(name: str, optional: bool = False) -> Path | None:
        return _download(repo_id, _path_in_repo(folder, name), force_download=force_download, optional=optional)

    if converter == "auto":
        cfg_path = fetch(io.CFG_FILENAME, optional=True)
        if cfg_path is None and fetch(io.GEMMA_SCOPE_FILENAME, optional=True) is not None:
            converter = "gemma_2"
        elif (
            cfg_path is not None
            and fetch(io.WEIGHTS_FILENAME, optional=True) is None
            and fetch(io.SPARSIFY_WEIGHTS_FILENAME, optional=True) is not None
        ):
            converter = "sparsify"
        else:
            converter = "sae_lens"

    if converter == "gemma_2":
        npz = fetch(io.GEMMA_SCOPE_FILENAME)
        overrides = gemma_scope_config(repo_id, folder) | overrides
        cfg, params = io.read_gemma_scope(npz.parent, overrides=overrides | {"dtype": dtype}, file=npz)
        if "embedding" in folder:  # trained on embeddings scaled by sqrt(d_model)
            params = dict(params)
            params["W_enc"] = params["W_enc"] / np.sqrt(cfg.d_in).astype(params["W_enc"].dtype)
            params["W_dec"] = params["W_dec"] * np.sqrt(cfg.d_in).astype(params["W_dec"].dtype)
        return cfg, params, None, norm_scaling_factor
    if converter == "sparsify":
        fetch(io.CFG_FILENAME)
        weights = fetch(io.SPARSIFY_WEIGHTS_FILENAME)
        cfg, params, sparsity = io.read_folder(weights.parent, dtype=dtype, overrides=overrides)
        return cfg, params, sparsity, norm_scaling_factor
    cfg_path = fetch(io.CFG_FILENAME)
    fetch(io.WEIGHTS_FILENAME)
    fetch(io.SPARSITY_FILENAME, optional=True)
    cfg, params, sparsity = io.read_folder(cfg_path.parent, dtype=dtype, overrides=overrides)
    return cfg, params, sparsity, norm_scaling_factor


_GEMMA_MODELS = {  # repo-id fragment -> (model name, residual width)
    "2b-it": ("gemma-2-2b-it", 2304),
    "9b-it": ("gemma-2-9b-it", 3584),
    "27b-it": ("gemma-2-27b-it", 4608),
    "2b": ("gemma-2-2b", 2304),
    "9b": ("gemma-2-9b", 3584),
    "27b": ("gemma-2-27b", 4608),
}


def gemma_scope_config(repo_id: str, folder: str) -> dict[str, Any]:
    """Metadata SAELens attaches to Gemma Scope SAEs (model, hook, dataset), from repo and folder names."""
    model = next((info for key, info in _GEMMA_MODELS.items() if key in repo_id), None)
    match = re.search(r"layer_(\d+)", folder)
    layer = int(match.group(1)) if match else 0
    if "embedding" in folder:
        hook = "hook_embed"
    elif "res" in repo_id:
        hook = f"blocks.{layer}.hook_resid_post"
    elif "mlp" in repo_id:
        hook = f"blocks.{layer}.hook_mlp_out"
    elif "att" in repo_id:
        hook = f"blocks.{layer}.attn.hook_z"
    else:
        hook = None
    out: dict[str, Any] = {
        "hook_name": hook,
        "prepend_bos": True,
        "context_size": 1024,
        "dataset_path": "monology/pile-uncopyrighted",
    }
    if model is not None:
        out["model_name"] = model[0]
    return out
