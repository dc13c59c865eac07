"""cfg.json: reading it, checking the JSON types of its fields, and turning it into a config and back.

Configs written before SAELens 6.0 are upgraded to the current field names as SAELens upgrades
them. Errors name the file and field, what was expected and what was found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from jsae._errors import ConfigError, FormatError, MissingFileError, close_names
from jsae.config import (
    SAELENS_FORMAT_VERSION,
    Metadata,
    SAEConfig,
    canonical_dtype,
)
from jsae.saes import get_architecture

CFG_FILENAME = "cfg.json"

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
    modes = arch.config_cls.normalize_modes
    if mode not in modes:
        raise ConfigError(
            f"{source}: normalize_activations must be one of {list(modes)}, got {mode!r}."
            + close_names(str(mode), modes)
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

