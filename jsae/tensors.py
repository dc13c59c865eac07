"""The tensors of SAE weight files: reading and writing safetensors, checking params against a
config (names, float dtypes, shapes), casting them to the config's dtype, and upgrading legacy names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jsae._errors import FormatError, MissingFileError, close_names
from jsae.config import SAEConfig


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


def non_finite_params(params: Mapping[str, Any]) -> list[str]:
    """'name: n_bad of size' for each parameter holding NaN or infinity, by name; empty when all are finite."""
    bad = []
    for name, value in sorted(params.items()):
        array = np.asarray(value, dtype=np.float32)
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            bad.append(f"{name}: {n_bad} of {array.size}")
    return bad


def check_finite_params(params: Mapping[str, Any], *, source: str) -> None:
    """Raise FormatError when a parameter holds NaN or infinity: such an SAE gives NaN outputs, which
    read as results. (sparsity is not a parameter: -inf there is the log10 density of a dead feature.)"""
    bad = non_finite_params(params)
    if bad:
        raise FormatError(f"{source}: the SAE's weights are not finite (NaN or infinite values in {'; '.join(bad)}); "
                          "its outputs would be NaN. Retrain it (a lower lr often helps), or load an earlier checkpoint.")


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
