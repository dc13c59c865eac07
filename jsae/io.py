"""Reading and writing SAE folders: SAELens (current and pre-6.0), EleutherAI sparsify, Gemma Scope.

Everything here turns files into (config, params, sparsity) with plain numpy arrays and back;
`jsae.SAE` wraps the result. Errors name the file or field, what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jsae._errors import FormatError, JsaeError, MissingFileError

# cfg.json, the weight tensors and the other libraries' formats live in their own modules; every
# name stays importable from jsae.io. `write_folder` calls `write_safetensors` through this
# module's namespace, so replacing `jsae.io.write_safetensors` changes what it writes with.
from jsae.cfg_json import (  # noqa: F401
    _EXPECTED,
    _LEGACY_RENAMES,
    _METADATA_TYPES,
    CFG_FILENAME,
    METADATA_KEYS,
    _annotation_kind,
    _has_json_type,
    check_config_types,
    check_json_type,
    check_metadata_types,
    config_from_dict,
    config_to_dict,
    describe_json,
    is_legacy_config,
    read_json,
    upgrade_legacy_config,
)
from jsae.config import SAEConfig, canonical_dtype
from jsae.converters import (  # noqa: F401
    GEMMA_SCOPE_FILENAME,
    SPARSIFY_WEIGHTS_FILENAME,
    read_gemma_scope,
    read_npz,
    read_sparsify,
)
from jsae.tensors import (  # noqa: F401
    cast_params,
    check_params,
    check_tensor_dtypes,
    expected_shapes,
    is_float_dtype,
    read_safetensors,
    upgrade_legacy_tensors,
    write_safetensors,
)

WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"


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
