"""Released SAEs: resolve a (release, sae_id) through SAELens' registry and fetch it from the Hub.

The registry is SAELens' own `pretrained_saes.yaml`: jsae's snapshot of it, or an installed newer
sae_lens' copy (`jsae.releases`). Files come from `huggingface_hub.hf_hub_download`, so its cache
and HF_HUB_OFFLINE apply unchanged; the release's converter (`jsae.converters`, keyed by SAELens'
conversion_func) turns them into a config and params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jsae import converters, releases
from jsae._errors import ConfigError, MissingFileError, close_names
from jsae.config import SAEConfig
from jsae.converters import saelens as saelens_converters
from jsae.releases import (  # noqa: F401
    RELEASE_ALIASES,
    Release,
    get_release,
    known_releases,
    saelens_registry,
    saelens_registry_path,
)

#: The built-in registry is the snapshot of SAELens' (see `jsae.releases`).
builtin_registry = releases.snapshot_registry


def resolve(release: str, sae_id: str) -> tuple[str, str, str, dict[str, Any], float | None]:
    """(repo_id, folder, converter, config_overrides, norm_scaling_factor) for a release + id.

    ConfigError for an unknown release or id, and for a conversion func jsae does not implement.
    """
    located = locate(release, sae_id)
    if located[2] != "auto":
        converters.get_converter(located[2], release=release)  # fail before any download
    return located


def locate(release: str, sae_id: str) -> tuple[str, str, str, dict[str, Any], float | None]:
    """`resolve` without checking that jsae implements the conversion func ('auto' for Hub ids)."""
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
    return entry.repo_id, entry.path(sae_id), converter, overrides, info.get("norm_scaling_factor")


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
    cfg, params = out.cfg, out.params
    if cfg.normalize_activations == "expected_average_only_in" and norm_scaling_factor is not None:
        cfg, params = fold_norm_scaling_factor(cfg, params, norm_scaling_factor)
    return cfg, params, out.sparsity, norm_scaling_factor


def fold_norm_scaling_factor(
    cfg: SAEConfig, params: dict[str, np.ndarray], scaling_factor: float
) -> tuple[SAEConfig, dict[str, np.ndarray]]:
    """The registry's input scale s folded in as SAELens folds it on load: W_enc * s, W_dec / s, b_dec / s.

    Computed in numpy the way torch computes a tensor-by-Python-float product (in float32 for 16- and
    32-bit weights, then rounded), so the weights equal SAELens' bit for bit; XLA may divide by
    multiplying with the reciprocal, which differs in the last bit. `SAE.fold_activation_norm_scaling_factor`
    is the same fold on device arrays.
    """
    params = dict(params)
    for name, op in (("W_enc", np.multiply), ("W_dec", np.divide), ("b_dec", np.divide)):
        value = np.asarray(params[name])
        compute = np.float64 if value.dtype == np.float64 else np.float32
        params[name] = op(value.astype(compute), compute(scaling_factor)).astype(value.dtype)
    return cfg.replace(normalize_activations="none"), params


