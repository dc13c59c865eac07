"""Folders of other libraries' SAE formats: EleutherAI sparsify folders and Gemma Scope `params.npz` files.

Each reader returns (config, params) in jsae's (SAELens') layout, checked as SAELens folders are;
`jsae.io.read_folder` uses them for local folders and the `sparsify` / `gemma_2` converters for
released ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jsae._errors import FormatError, MissingFileError
from jsae.cfg_json import CFG_FILENAME, check_json_type, config_from_dict, describe_json, read_json
from jsae.config import SAELENS_FORMAT_VERSION, SAEConfig
from jsae.tensors import cast_params, check_params, check_tensor_dtypes, read_safetensors, upgrade_legacy_tensors

SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
GEMMA_SCOPE_FILENAME = "params.npz"


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
        from jsae.converters.sparsify_coders import read_sparsify_transcoder

        return read_sparsify_transcoder(path, raw, overrides=overrides)
    if raw.get("activation", "topk") != "topk":
        raise FormatError(f"{cfg_path}: sparsify activation {raw.get('activation')!r} is not supported (only 'topk').")
    weights_path, tensors = read_sparsify_tensors(path)
    match = re.search(r"layers[._](\d+)", path.name)
    hook_name = (
        "hook_embed" if path.name == "embed_tokens" else (f"blocks.{match.group(1)}.hook_resid_post" if match else None)
    )
    cfg_dict = {
        "architecture": "topk",
        "d_in": int(raw["d_in"]),
        "d_sae": sparsify_num_latents(raw),
        "k": int(raw["k"]),
        "dtype": str(np.dtype(tensors["encoder.weight"].dtype)),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook_name, "hf_hook_name": path.name, "sae_lens_version": SAELENS_FORMAT_VERSION},
    }
    cfg = config_from_dict(cfg_dict, source=str(cfg_path), overrides=overrides)
    params = sparsify_params(tensors)
    check_params(params, cfg, source=str(weights_path))
    return cfg, cast_params(params, cfg.dtype, source=str(weights_path))


def read_sparsify_tensors(path: Path, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """(file, tensors) of a sparsify folder's sae.safetensors, checked to hold float encoder.weight,
    encoder.bias, W_dec, b_dec and the `extra` tensors."""
    weights_path = path / SPARSIFY_WEIGHTS_FILENAME
    tensors = read_safetensors(weights_path)
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec", *extra):
        if key not in tensors:
            raise FormatError(f"{weights_path}: missing tensor {key!r} (found {sorted(tensors)}).")
    check_tensor_dtypes(tensors, source=str(weights_path))
    return weights_path, tensors


def sparsify_num_latents(raw: Mapping[str, Any]) -> int:
    """d_sae of a sparsify cfg.json: num_latents, else d_in * expansion_factor (sparsify's default 32)."""
    return int(raw.get("num_latents") or raw["d_in"] * (raw.get("expansion_factor") or 32))


def sparsify_params(tensors: Mapping[str, Any]) -> dict:
    """jsae's (SAELens') encoder and decoder of sparsify's tensors: W_enc is encoder.weight (num_latents,
    d_in) transposed; W_dec is already (num_latents, d_in)."""
    return {
        "W_enc": np.ascontiguousarray(tensors["encoder.weight"].T),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }


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
