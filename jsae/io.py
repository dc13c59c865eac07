"""Reading and writing SAE folders: SAELens (current and pre-6.0), EleutherAI sparsify, Gemma Scope.

Everything here turns files into (config, params, sparsity) with plain numpy arrays and back;
`jsae.SAE` wraps the result. Errors name the file or field, what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from packaging.version import InvalidVersion, Version

from jsae._errors import ConfigError, FormatError, JsaeError, MissingFileError, close_names
from jsae.config import (
    NORMALIZE_MODES,
    SAELENS_FORMAT_VERSION,
    Metadata,
    SAEConfig,
    canonical_dtype,
)
from jsae.saes import get_architecture

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
GEMMA_SCOPE_FILENAME = "params.npz"

#: cfg keys SAELens keeps in `metadata` (model, hook and dataset facts).
METADATA_KEYS = frozenset(
    {
        "model_name",
        "hook_name",
        "model_class_name",
        "hook_head_index",
        "model_from_pretrained_kwargs",
        "prepend_bos",
        "exclude_special_tokens",
        "neuronpedia_id",
        "context_size",
        "seqpos_slice",
        "dataset_path",
        "sae_lens_version",
        "sae_lens_training_version",
        "hook_name_out",
        "hook_head_index_out",
        "hf_hook_name",
        "hf_hook_name_out",
        "sequence_separator_token",
        "disable_concat_sequences",
        "l0",
        "num_dead_features",
    }
)
_LEGACY_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}


# --------------------------------------------------------------------------- configs
def is_legacy_config(cfg_dict: Mapping[str, Any]) -> bool:
    """True for configs written before SAELens 6.0 (no version, or a version below 6)."""
    version = cfg_dict.get("sae_lens_version")
    if not version and isinstance(cfg_dict.get("metadata"), Mapping):
        version = cfg_dict["metadata"].get("sae_lens_version")
    if not version:
        return True
    try:
        return Version(str(version)) < Version("6.0.0rc0")
    except InvalidVersion:
        return False


def upgrade_legacy_config(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map a pre-6.0 SAELens cfg dict onto the current field names (as SAELens does on load)."""
    new = {_LEGACY_RENAMES.get(k, k): v for k, v in cfg_dict.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    new.setdefault("prepend_bos", True)
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in str(new.get("hook_name") or "") else "none")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    metadata = dict(new.get("metadata") or {})
    metadata.update({k: v for k, v in new.items() if k in METADATA_KEYS})
    new["metadata"] = metadata
    return new


def config_from_dict(
    cfg_dict: Mapping[str, Any],
    *,
    source: str = CFG_FILENAME,
    overrides: Mapping[str, Any] | None = None,
) -> SAEConfig:
    """Build the architecture's config from a cfg.json dict (legacy formats upgraded).

    Unknown top-level keys are dropped, as SAELens drops them (training configs carry many);
    `overrides` (e.g. a registry's config_overrides) are applied first, and any of them that
    are metadata keys land in `metadata`.
    """
    if not isinstance(cfg_dict, Mapping):
        raise FormatError(f"{source}: expected a JSON object, found {type(cfg_dict).__name__}.")
    d = dict(cfg_dict)
    if overrides:
        d.update(overrides)
    if is_legacy_config(d):
        d = upgrade_legacy_config(d)
    metadata = dict(d.get("metadata") or {})
    for key in METADATA_KEYS & set(overrides or {}):
        metadata[key] = overrides[key]  # type: ignore[index]
    d["metadata"] = metadata

    arch = get_architecture(d.get("architecture", "standard"), where=f"{source}: architecture")
    for required in ("d_in", "d_sae"):
        if required not in d:
            raise FormatError(f"{source}: missing required field {required!r} (architecture {arch.name!r}).")
    if "dtype" in d:
        d["dtype"] = canonical_dtype(d["dtype"], field=f"{source}: dtype")
    if d.get("normalize_activations") is None:
        d["normalize_activations"] = "none"
    mode = d["normalize_activations"]
    if mode not in NORMALIZE_MODES:
        raise ConfigError(
            f"{source}: normalize_activations must be one of {list(NORMALIZE_MODES)}, got {mode!r}."
            + close_names(str(mode), NORMALIZE_MODES)
        )
    if d.get("device") is None:
        d.pop("device", None)
    fields = set(arch.config_cls.field_names())
    kwargs = {k: v for k, v in d.items() if k in fields}
    kwargs["metadata"] = Metadata(metadata)
    try:
        return arch.config_cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from err


def config_to_dict(cfg: SAEConfig) -> dict[str, Any]:
    """cfg.json dict; stamps the SAELens format version so SAELens does not treat it as legacy."""
    out = cfg.to_dict()
    meta = out["metadata"]
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("sae_lens_training_version", meta["sae_lens_version"])
    return out


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found (an SAE folder needs {path.name}).")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON ({err}).") from err


# --------------------------------------------------------------------------- tensors
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bf16 via ml_dtypes)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingFileError(f"{path}: file not found.")
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable safetensors file, truncated or corrupt ({err}).") from err


def write_safetensors(path: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}, str(path))


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape for cfg's architecture (read off the module, no compute)."""
    import jax

    from jsae.saes import init_params

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in shapes.items()}


def check_params(params: Mapping[str, Any], cfg: SAEConfig, *, source: str) -> None:
    """Raise FormatError unless params hold exactly the architecture's tensors with the right shapes."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise FormatError(
            f"{source}: missing tensor(s) {missing}; architecture {cfg.architecture!r} needs {sorted(shapes)}."
        )
    extra = sorted(set(params) - set(shapes))
    if extra:
        raise FormatError(
            f"{source}: unknown tensor(s) {extra} for architecture {cfg.architecture!r}, "
            f"which has exactly {sorted(shapes)}." + close_names(extra[0], shapes)
        )
    for name, shape in shapes.items():
        found = tuple(np.shape(params[name]))
        if found != shape:
            raise FormatError(
                f"{source}: tensor {name!r} has shape {found}, but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}"
                + (f", d_out={cfg.d_out}" if cfg.d_out != cfg.d_in else "")
                + f") calls for {shape}."
            )


def cast_params(params: Mapping[str, np.ndarray], dtype_name: str) -> dict[str, np.ndarray]:
    from jsae.config import DTYPES

    target = np.dtype(DTYPES[dtype_name])
    return {k: (v if v.dtype == target else v.astype(target)) for k, v in params.items()}


def upgrade_legacy_tensors(tensors: dict[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
    """Drop an all-ones `scaling_factor`; turn `log_threshold` into `threshold = exp(log_threshold)`."""
    tensors = dict(tensors)
    if "scaling_factor" in tensors:
        factor = tensors.pop("scaling_factor")
        if not np.allclose(np.asarray(factor, np.float32), 1.0):
            raise FormatError(
                f"{source}: tensor 'scaling_factor' is not all ones (a finetuning scaling factor); "
                "jsae (like SAELens 6) cannot apply it."
            )
    if "log_threshold" in tensors:
        log_threshold = tensors.pop("log_threshold")
        tensors["threshold"] = np.exp(log_threshold.astype(np.float32)).astype(log_threshold.dtype)
    return tensors


# --------------------------------------------------------------------------- folder formats
def detect_format(path: Path) -> str:
    """'saelens', 'sparsify' or 'gemma_scope' from the files in `path`."""
    if not path.exists():
        raise MissingFileError(f"{path}: no such SAE folder.")
    if not path.is_dir():
        raise FormatError(f"{path}: expected a folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME}, found a file.")
    if (path / GEMMA_SCOPE_FILENAME).is_file() and not (path / WEIGHTS_FILENAME).exists():
        return "gemma_scope"
    if (path / SPARSIFY_WEIGHTS_FILENAME).is_file() and not (path / WEIGHTS_FILENAME).exists():
        return "sparsify"
    return "saelens"


def read_folder(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[SAEConfig, dict[str, np.ndarray], np.ndarray | None]:
    """Read any supported SAE folder into (config, params, log10 sparsity or None)."""
    path = Path(path)
    fmt = detect_format(path)
    overrides = dict(overrides or {})
    if dtype is not None:
        overrides["dtype"] = canonical_dtype(dtype, field="dtype argument")
    if fmt == "sparsify":
        cfg, params = read_sparsify(path, overrides=overrides)
        sparsity = None
    elif fmt == "gemma_scope":
        cfg, params = read_gemma_scope(path, overrides=overrides)
        sparsity = None
    else:
        cfg_path = path / CFG_FILENAME
        if not cfg_path.is_file():
            raise MissingFileError(
                f"{cfg_path}: file not found; an SAELens folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME}."
            )
        cfg = config_from_dict(read_json(cfg_path), source=str(cfg_path), overrides=overrides)
        weights_path = path / WEIGHTS_FILENAME
        if not weights_path.is_file():
            raise MissingFileError(f"{weights_path}: file not found (the SAE's weights).")
        params = upgrade_legacy_tensors(read_safetensors(weights_path), source=str(weights_path))
        check_params(params, cfg, source=str(weights_path))
        params = cast_params(params, cfg.dtype)
        sparsity = read_sparsity(path / SPARSITY_FILENAME, cfg.d_sae)
    return cfg, params, sparsity


def read_sparsity(path: Path, d_sae: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    tensors = read_safetensors(path)
    if "sparsity" not in tensors:
        raise FormatError(f"{path}: expected a tensor named 'sparsity', found {sorted(tensors)}.")
    sparsity = tensors["sparsity"]
    if sparsity.shape != (d_sae,):
        raise FormatError(f"{path}: 'sparsity' has shape {sparsity.shape}, expected ({d_sae},).")
    return sparsity


def read_sparsify(path: Path, *, overrides: Mapping[str, Any] | None = None) -> tuple[SAEConfig, dict]:
    """An EleutherAI sparsify folder (cfg.json + sae.safetensors) as a TopK SAE.

    sparsify encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)) and decodes
    acts @ W_dec + b_dec with W_dec stored (num_latents, d_in), which is exactly jsae's topk.
    """
    cfg_path = path / CFG_FILENAME
    raw = read_json(cfg_path)
    for key in ("d_in", "k"):
        if key not in raw:
            raise FormatError(f"{cfg_path}: sparsify config lacks {key!r}.")
    if raw.get("transcode") or raw.get("skip_connection"):
        raise FormatError(f"{cfg_path}: sparsify transcoders / skip connections are not supported yet.")
    if raw.get("activation", "topk") != "topk":
        raise FormatError(f"{cfg_path}: sparsify activation {raw.get('activation')!r} is not supported (only 'topk').")
    weights_path = path / SPARSIFY_WEIGHTS_FILENAME
    tensors = read_safetensors(weights_path)
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in tensors:
            raise FormatError(f"{weights_path}: missing tensor {key!r} (found {sorted(tensors)}).")
    d_sae = raw.get("num_latents") or raw["d_in"] * raw.get("expansion_factor", 32)
    match = re.search(r"layers[._](\d+)", path.name)
    hook_name = (
        "hook_embed" if path.name == "embed_tokens" else (f"blocks.{match.group(1)}.hook_resid_post" if match else None)
    )
    cfg_dict = {
        "architecture": "topk",
        "d_in": int(raw["d_in"]),
        "d_sae": int(d_sae),
        "k": int(raw["k"]),
        "dtype": str(np.dtype(tensors["encoder.weight"].dtype)),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook_name, "hf_hook_name": path.name, "sae_lens_version": SAELENS_FORMAT_VERSION},
    }
    cfg = config_from_dict(cfg_dict, source=str(cfg_path), overrides=overrides)
    params = {
        "W_enc": np.ascontiguousarray(tensors["encoder.weight"].T),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    check_params(params, cfg, source=str(weights_path))
    return cfg, cast_params(params, cfg.dtype)


def read_gemma_scope(
    path: Path, *, overrides: Mapping[str, Any] | None = None, file: Path | None = None
) -> tuple[SAEConfig, dict]:
    """A Gemma Scope `params.npz` (w_enc, w_dec, b_enc, b_dec, threshold) as a JumpReLU SAE.

    Gemma Scope computes relu(h) * (h > threshold) with h = x @ W_enc + b_enc — no b_dec on input.
    """
    file = file or path / GEMMA_SCOPE_FILENAME
    try:
        with np.load(file) as data:
            raw = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise FormatError(f"{file}: not a readable .npz file ({err}).") from err
    params = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    if "W_enc" not in params:
        raise FormatError(f"{file}: missing array 'w_enc' (found {sorted(raw)}).")
    d_in, d_sae = params["W_enc"].shape
    cfg_dict = {
        "architecture": "jumprelu",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION},
    }
    cfg = config_from_dict(cfg_dict, source=str(file), overrides=overrides)
    params = upgrade_legacy_tensors(params, source=str(file))
    check_params(params, cfg, source=str(file))
    return cfg, cast_params(params, cfg.dtype)


# --------------------------------------------------------------------------- writing
def write_folder(
    path: str | os.PathLike,
    cfg: SAEConfig,
    params: Mapping[str, Any],
    sparsity: Any | None = None,
) -> tuple[Path, Path]:
    """Write an SAELens folder atomically: build it beside `path`, then rename into place.

    Files already in an existing folder that jsae does not write (runner_cfg.json, ...) are kept.
    Returns (weights path, cfg path) as SAELens' save_model does.
    """
    path = Path(path)
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise JsaeError(f"cannot write SAE folder {path}: {parent} is a file, not a folder.")
    if path.exists() and not path.is_dir():
        raise JsaeError(f"cannot write SAE folder {path}: a file with that name exists.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as err:
        raise JsaeError(f"cannot write SAE folder {path}: {parent} is not writable ({err}).") from err
    try:
        ours = {CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME}
        if path.is_dir():
            for item in path.iterdir():
                if item.name not in ours:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_safetensors(tmp / WEIGHTS_FILENAME, params)
        if sparsity is not None:
            write_safetensors(tmp / SPARSITY_FILENAME, {"sparsity": sparsity})
        with open(tmp / CFG_FILENAME, "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2, allow_nan=False, default=_json_default)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path / WEIGHTS_FILENAME, path / CFG_FILENAME


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, swapping out an existing `target` with renames only."""
    if not target.exists():
        os.rename(new, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cfg.json: value {value!r} of type {type(value).__name__} is not JSON-serialisable")
