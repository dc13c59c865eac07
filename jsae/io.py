"""Reading and writing SAE folders: SAELens (current and pre-6.0), EleutherAI sparsify, Gemma Scope.

Everything here turns files into (config, params, sparsity) with plain numpy arrays and back;
`jsae.SAE` wraps the result. Errors name the file or field, what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
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
#: metadata keys jsae and its tools read, with the JSON type SAELens gives them (null allowed).
_METADATA_TYPES = {
    "model_name": "str",
    "hook_name": "str",
    "hook_name_out": "str",
    "model_class_name": "str",
    "dataset_path": "str",
    "neuronpedia_id": "str",
    "hook_head_index": "int",
    "hook_head_index_out": "int",
    "context_size": "int",
    "prepend_bos": "bool",
}
_EXPECTED = {
    "bool": "a JSON boolean (true or false)",
    "int": "a JSON integer",
    "number": "a JSON number",
    "str": "a JSON string",
    "object": "a JSON object",
}


def describe_json(value: Any) -> str:
    """How a JSON value reads in an error message: "the string 'false'", "an array", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {text!r}"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a Python {type(value).__name__}"


def _has_json_type(value: Any, kind: str) -> bool:
    # bool is a subclass of int in Python but a distinct type in JSON: true is not 1.
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, Mapping)
    raise AssertionError(kind)


def check_json_type(value: Any, kind: str, *, field: str, source: str, optional: bool = False) -> None:
    """Raise ConfigError naming `field` and `source` unless `value` has JSON type `kind` (or is null if `optional`)."""
    if (optional and value is None) or _has_json_type(value, kind):
        return
    expected = _EXPECTED[kind] + (" or null" if optional else "")
    if kind == "bool" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        fix = f"write {value.strip().lower()} without quotes"
    elif kind == "int" and isinstance(value, float) and value.is_integer():
        fix = f"write {int(value)}"
    elif kind in ("int", "number") and isinstance(value, str):
        fix = "write the number without quotes"
    else:
        fix = f"give it {_EXPECTED[kind]}"
    raise ConfigError(
        f"{source}: field {field!r} must be {expected}, found {describe_json(value)}; edit the file and {fix}."
    )


def _annotation_kind(annotation: Any) -> tuple[str | None, bool]:
    """(JSON kind, null allowed) for a config field's annotation; (None, _) when jsae does not check it."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [part.strip() for part in text.split("|")]
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    kinds = {"bool": "bool", "int": "int", "float": "number", "str": "str"}
    if len(parts) == 1 and parts[0] in kinds:
        return kinds[parts[0]], optional
    return None, optional


def check_config_types(cls: type, values: Mapping[str, Any], *, source: str) -> None:
    """Type-check the cfg.json values of `cls`'s fields before the config class sees them."""
    import dataclasses

    for field in dataclasses.fields(cls):
        if field.name not in values or field.name == "metadata":
            continue
        kind, optional = _annotation_kind(field.type)
        if kind is not None:
            check_json_type(values[field.name], kind, field=field.name, source=source, optional=optional)


def check_metadata_types(metadata: Mapping[str, Any], *, source: str) -> None:
    for key, kind in _METADATA_TYPES.items():
        if key in metadata:
            check_json_type(metadata[key], kind, field=f"metadata.{key}", source=source, optional=True)


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


def upgrade_legacy_config(cfg_dict: Mapping[str, Any], *, source: str = CFG_FILENAME) -> dict[str, Any]:
    """Map a pre-6.0 SAELens cfg dict onto the current field names (as SAELens does on load)."""
    new = {_LEGACY_RENAMES.get(k, k): v for k, v in cfg_dict.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    new.setdefault("prepend_bos", True)
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in str(new.get("hook_name") or "") else "none")
    kwargs = new.get("activation_fn_kwargs")
    kwargs = {} if kwargs is None else kwargs
    check_json_type(kwargs, "object", field="activation_fn_kwargs", source=source)
    if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    metadata = new.get("metadata")
    metadata = {} if metadata is None else metadata
    check_json_type(metadata, "object", field="metadata", source=source)
    metadata = dict(metadata)
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
    if d.get("metadata") is not None:
        check_json_type(d["metadata"], "object", field="metadata", source=source)
    if is_legacy_config(d):
        d = upgrade_legacy_config(d, source=source)
    metadata = dict(d.get("metadata") or {})
    for key in METADATA_KEYS & set(overrides or {}):
        metadata[key] = overrides[key]  # type: ignore[index]
    d["metadata"] = metadata
    check_metadata_types(metadata, source=source)

    architecture = d.get("architecture", "standard")
    check_json_type(architecture, "str", field="architecture", source=source)
    arch = get_architecture(architecture, where=f"{source}: architecture")
    for required in ("d_in", "d_sae"):
        if required not in d:
            raise FormatError(f"{source}: missing required field {required!r} (architecture {arch.name!r}).")
    if d.get("normalize_activations") is None:
        d["normalize_activations"] = "none"
    if d.get("device") is None:
        d.pop("device", None)
    # Every field the config class takes is checked against its annotation: a JSON string
    # "false" must never reach a bool field, where it would read as true.
    check_config_types(arch.config_cls, d, source=source)
    if "dtype" in d:
        d["dtype"] = canonical_dtype(d["dtype"], field=f"{source}: dtype")
    mode = d["normalize_activations"]
    if mode not in NORMALIZE_MODES:
        raise ConfigError(
            f"{source}: normalize_activations must be one of {list(NORMALIZE_MODES)}, got {mode!r}."
            + close_names(str(mode), NORMALIZE_MODES)
        )
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
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON ({err}).") from err
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 1].hex()
        raise FormatError(
            f"{path}: not UTF-8 text (byte 0x{bad} at offset {err.start}); JSON files must be UTF-8, "
            "so re-save it with UTF-8 encoding."
        ) from err
    except RecursionError as err:
        raise FormatError(
            f"{path}: JSON nested too deeply to read; a cfg.json is a flat object of fields (with a "
            "'metadata' object), so this file is not an SAE config."
        ) from err


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
    except Exception as err:  # any other failure to parse the bytes is still a bad file, never a crash
        raise FormatError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({type(err).__name__}: {err})."
        ) from err


def write_safetensors(path: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}, str(path))


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape for cfg's architecture (read off the module, no compute)."""
    import jax

    from jsae.saes import init_params

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in shapes.items()}


def is_float_dtype(dtype: Any) -> bool:
    """True for real floating dtypes, numpy's and ml_dtypes' (bfloat16, float8_*); False for ints, bools, complex."""
    import ml_dtypes

    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    if dtype.kind != "V" or dtype.fields is not None:
        return False
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def check_tensor_dtypes(tensors: Mapping[str, Any], *, source: str, what: str = "tensor") -> None:
    """Raise FormatError naming the first tensor that is not floating point.

    Integer, boolean and complex arrays are never SAE parameters: casting them to the config's
    float dtype would load quantised codes, masks or dropped imaginary parts as weights.
    """
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
        if not is_float_dtype(dtype):
            raise FormatError(
                f"{source}: {what} {name!r} has dtype {dtype.name}; expected floats (float32, float16, bfloat16 "
                "or float64). jsae does not convert integer, boolean or complex tensors into weights; "
                "write the file with float tensors."
            )


def check_params(params: Mapping[str, Any], cfg: SAEConfig, *, source: str) -> None:
    """Raise FormatError unless params hold exactly the architecture's float tensors with the right shapes."""
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
    check_tensor_dtypes(params, source=source)
    for name, shape in shapes.items():
        found = tuple(np.shape(params[name]))
        if len(found) != len(shape):
            raise FormatError(
                f"{source}: tensor {name!r} is {len(found)}-D with shape {found}; expected a {len(shape)}-D "
                f"tensor of shape {shape} (d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                + (f", d_out={cfg.d_out}" if cfg.d_out != cfg.d_in else "")
                + "). The file does not hold this architecture's parameters as SAELens lays them out."
            )
        if found != shape:
            raise FormatError(
                f"{source}: tensor {name!r} has shape {found}, but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}"
                + (f", d_out={cfg.d_out}" if cfg.d_out != cfg.d_in else "")
                + f") calls for {shape}."
            )


def cast_params(params: Mapping[str, np.ndarray], dtype_name: str, *, source: str = "params") -> dict[str, np.ndarray]:
    """Params in dtype `dtype_name`; FormatError if the conversion turns finite values into inf/NaN."""
    import ml_dtypes

    from jsae.config import DTYPES

    target = np.dtype(DTYPES[dtype_name])
    out = {}
    for name, value in params.items():
        if value.dtype == target:
            out[name] = value
            continue
        # The overflow is reported below as an error naming the tensor, not as numpy's warning.
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(target)
        if not np.isfinite(cast).all():
            became = np.isfinite(value) & ~np.isfinite(cast)
            count = int(np.count_nonzero(became))
            if count:
                largest = float(np.max(np.abs(value[became].astype(np.float64))))
                raise FormatError(
                    f"{source}: tensor {name!r}: {count} finite value(s) become inf/NaN in {dtype_name} "
                    f"(largest magnitude {largest:.4g}; {dtype_name} holds at most "
                    f"{float(ml_dtypes.finfo(target).max):.4g}). Load it in a wider dtype (dtype='float32')."
                )
        out[name] = cast
    return out


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
        tensors = read_safetensors(weights_path)
        check_tensor_dtypes(tensors, source=str(weights_path))
        params = upgrade_legacy_tensors(tensors, source=str(weights_path))
        check_params(params, cfg, source=str(weights_path))
        params = cast_params(params, cfg.dtype, source=str(weights_path))
        sparsity = read_sparsity(path / SPARSITY_FILENAME, cfg.d_sae)
    return cfg, params, sparsity


def read_sparsity(path: Path, d_sae: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    tensors = read_safetensors(path)
    if "sparsity" not in tensors:
        raise FormatError(f"{path}: expected a tensor named 'sparsity', found {sorted(tensors)}.")
    sparsity = tensors["sparsity"]
    check_tensor_dtypes({"sparsity": sparsity}, source=str(path))
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
    if not isinstance(raw, Mapping):
        raise FormatError(f"{cfg_path}: expected a JSON object, found {describe_json(raw)}.")
    for key in ("d_in", "k"):
        if key not in raw:
            raise FormatError(f"{cfg_path}: sparsify config lacks {key!r}.")
    for key, kind, optional in (
        ("d_in", "int", False),
        ("k", "int", False),
        ("num_latents", "int", True),
        ("expansion_factor", "int", True),
        ("activation", "str", True),
    ):
        if key in raw:
            check_json_type(raw[key], kind, field=key, source=str(cfg_path), optional=optional)
    if raw.get("transcode") or raw.get("skip_connection"):
        raise FormatError(f"{cfg_path}: sparsify transcoders / skip connections are not supported yet.")
    if raw.get("activation", "topk") != "topk":
        raise FormatError(f"{cfg_path}: sparsify activation {raw.get('activation')!r} is not supported (only 'topk').")
    weights_path = path / SPARSIFY_WEIGHTS_FILENAME
    tensors = read_safetensors(weights_path)
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in tensors:
            raise FormatError(f"{weights_path}: missing tensor {key!r} (found {sorted(tensors)}).")
    check_tensor_dtypes(tensors, source=str(weights_path))
    d_sae = raw.get("num_latents") or raw["d_in"] * (raw.get("expansion_factor") or 32)
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
    return cfg, cast_params(params, cfg.dtype, source=str(weights_path))


def read_gemma_scope(
    path: Path, *, overrides: Mapping[str, Any] | None = None, file: Path | None = None
) -> tuple[SAEConfig, dict]:
    """A Gemma Scope `params.npz` (w_enc, w_dec, b_enc, b_dec, threshold) as a JumpReLU SAE.

    Gemma Scope computes relu(h) * (h > threshold) with h = x @ W_enc + b_enc — no b_dec on input.
    """
    file = file or path / GEMMA_SCOPE_FILENAME
    raw = read_npz(file)
    params = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    if "W_enc" not in params:
        raise FormatError(f"{file}: missing array 'w_enc' (found {sorted(raw)}).")
    check_tensor_dtypes(raw, source=str(file), what="array")
    if params["W_enc"].ndim != 2:
        raise FormatError(
            f"{file}: array 'w_enc' has shape {params['W_enc'].shape}; expected a 2-D (d_in, d_sae) matrix, "
            "as in Gemma Scope's params.npz."
        )
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
    return cfg, cast_params(params, cfg.dtype, source=str(file))


def read_npz(file: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz archive (no pickled objects); FormatError for anything else."""
    what = "Gemma Scope's params.npz is a zip of the arrays w_enc, w_dec, b_enc, b_dec and threshold"
    try:
        with open(file, "rb") as f:
            head = f.read(8)
    except FileNotFoundError as err:
        raise MissingFileError(f"{file}: file not found.") from err
    except OSError as err:
        raise FormatError(f"{file}: cannot be read ({err}).") from err
    if head.startswith(b"\x93NUMPY"):
        raise FormatError(f"{file}: a single .npy array, not an .npz archive; {what}.")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise FormatError(
            f"{file}: not a NumPy .npz archive (it starts with {head!r}, not a zip header); {what}. "
            "Download it again."
        )
    try:
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # zip, zlib and .npy header failures alike mean a damaged file
        raise FormatError(
            f"{file}: not a readable .npz archive, truncated or corrupt ({type(err).__name__}: {err}); "
            f"{what}. Download it again."
        ) from err


# --------------------------------------------------------------------------- writing
def write_folder(
    path: str | os.PathLike,
    cfg: SAEConfig,
    params: Mapping[str, Any],
    sparsity: Any | None = None,
) -> tuple[Path, Path]:
    """Write an SAELens folder atomically: build it beside `path`, then rename into place.

    Files already in an existing folder that jsae does not write (runner_cfg.json, ...) are kept;
    symbolic links among them stay links (their targets are neither read nor copied). If `path`
    itself is a link to a folder, the folder it points to is written and the link is kept.
    The folder and its files get the permissions `mkdir` and `open` give under the umask.
    Returns (weights path, cfg path) as SAELens' save_model does.
    """
    path = _check_target(path)
    if path.is_symlink() and not path.exists():
        raise JsaeError(
            f"cannot write SAE folder {path}: it is a symbolic link to {os.readlink(path)}, which does not exist; "
            "create that folder or remove the link."
        )
    # Writing through a link to a folder: the rename swaps the real folder, the link stays.
    real = path.resolve() if path.is_symlink() and path.is_dir() else path
    parent = real.parent
    if parent.exists() and not parent.is_dir():
        raise JsaeError(f"cannot write SAE folder {path}: {parent} is a file, not a folder.")
    if real.exists() and not real.is_dir():
        raise JsaeError(f"cannot write SAE folder {path}: a file with that name exists.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_sibling_dir(real)
    except OSError as err:
        raise JsaeError(f"cannot write SAE folder {path}: {parent} is not writable ({err}).") from err
    try:
        ours = {CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME}
        if real.is_dir():
            for item in real.iterdir():
                if item.name not in ours:
                    _copy_keeping_links(item, tmp / item.name)
        with open(tmp / CFG_FILENAME, "w", encoding="utf-8") as f:
            json.dump(config_to_dict(cfg), f, indent=2, allow_nan=False, default=_json_default)
        # safetensors creates its files 0600; give them the mode `open` gave cfg.json.
        file_mode = stat.S_IMODE(os.stat(tmp / CFG_FILENAME).st_mode)
        write_safetensors(tmp / WEIGHTS_FILENAME, params)
        os.chmod(tmp / WEIGHTS_FILENAME, file_mode)
        if sparsity is not None:
            write_safetensors(tmp / SPARSITY_FILENAME, {"sparsity": sparsity})
            os.chmod(tmp / SPARSITY_FILENAME, file_mode)
        _replace_dir(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path / WEIGHTS_FILENAME, path / CFG_FILENAME


def _check_target(path: str | os.PathLike) -> Path:
    """`path` as a Path; JsaeError for "" and for the current folder or one that contains it.

    Saving replaces the whole folder (everything in it is copied into the new one first), so
    the current folder or an ancestor of it is never a sensible target.
    """
    if os.fspath(path) == "":
        raise JsaeError(
            "cannot write SAE folder '': the path is empty, which would mean the current folder; "
            "give a folder name such as 'my_sae'."
        )
    target = Path(path)
    try:
        resolved = target.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError):
        return target
    if resolved == cwd:
        raise JsaeError(
            f"cannot write SAE folder {os.fspath(path)!r}: it is the current folder, which saving would replace "
            "as a whole; give a new or SAE-only folder such as 'my_sae'."
        )
    if resolved in cwd.parents:
        raise JsaeError(
            f"cannot write SAE folder {os.fspath(path)!r}: it contains the current folder ({cwd}), which saving "
            "would replace as a whole; give a new or SAE-only folder such as 'my_sae'."
        )
    return target


def _make_sibling_dir(target: Path) -> Path:
    """A new empty folder beside `target`, created with `mkdir`'s mode under the umask."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {target}")


def _copy_keeping_links(src: Path, dst: Path) -> None:
    """Copy a file or folder; symbolic links (at any depth) are copied as links, never followed."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


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
