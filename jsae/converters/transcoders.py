"""Released transcoders: `gemma_2_transcoder` (Gemma Scope transcoders, `params.npz`),
`mwhanna_transcoder` (one safetensors file per layer + wandb / model YAML at the repository root)
and `mntss_clt_layer_transcoder` (one layer of a cross-layer transcoder, read as a transcoder).

Configs, hook names (`hook_name` in, `hook_name_out` out) and tensor processing follow
sae_lens/loading/pretrained_sae_loaders.py (the `*_transcoder_*` loaders and config getters);
SAELens' cfg overrides (the release's config_overrides, neuronpedia id, requested dtype) apply last.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jsae._errors import FormatError
from jsae.cfg_json import config_from_dict
from jsae.converters._source import Converted, Source
from jsae.converters.folders import GEMMA_SCOPE_FILENAME, read_npz
from jsae.converters.gemma import _GEMMA_2_MODELS
from jsae.tensors import cast_params, check_params, check_tensor_dtypes, read_safetensors


def build(cfg_dict: dict[str, Any], params: dict[str, np.ndarray], src: Source, source: str) -> Converted:
    """Config from a SAELens-loader-style flat cfg dict (metadata keys at the top, no
    sae_lens_version, so upgraded as SAELens upgrades it) with `src.overrides` applied; params
    checked against it and cast to its dtype."""
    cfg = config_from_dict(cfg_dict, source=source, overrides=src.overrides)
    check_tensor_dtypes(params, source=source)
    check_params(params, cfg, source=source)
    return Converted(cfg, cast_params(params, cfg.dtype, source=source))


def read_yaml(path: Path) -> Any:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise FormatError(f"{path}: not readable YAML ({err}).") from err


def yaml_field(data: Any, *keys: str, source: Path) -> Any:
    """data[keys[0]][keys[1]]...; FormatError naming the dotted key when absent."""
    value = data
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise FormatError(f"{source}: missing {'.'.join(keys[: i + 1])!r}.")
        value = value[key]
    return value


def tensor(tensors: dict[str, np.ndarray], key: str, source: Path) -> np.ndarray:
    if key not in tensors:
        raise FormatError(f"{source}: missing tensor {key!r} (found {sorted(tensors)}).")
    return tensors[key]


def widths(params: dict[str, np.ndarray], source: Path) -> dict[str, int]:
    """d_in, d_sae (and d_out) read off W_enc (d_in, d_sae) and W_dec (d_sae, d_out): the files'
    own widths, which equal those SAELens reads from names for the released files."""
    W_enc, W_dec = tensor(params, "W_enc", source), tensor(params, "W_dec", source)
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise FormatError(f"{source}: W_enc {W_enc.shape} and W_dec {W_dec.shape} must be 2-D matrices.")
    return {"d_in": int(W_enc.shape[0]), "d_sae": int(W_enc.shape[1]), "d_out": int(W_dec.shape[1])}


# --------------------------------------------------------------------------- gemma_2_transcoder
_WIDTHS = {"width_4k": 4096, "width_16k": 16384, "width_65k": 65536, "width_262k": 262144,
           "width_524k": 524288, "width_1m": 1048576}
#: lower-cased params.npz key -> SAELens tensor name (the spellings SAELens accepts).
_NPZ_NAMES = {"w_enc": "W_enc", "wenc": "W_enc", "w_e": "W_enc", "w_dec": "W_dec", "wdec": "W_dec", "w_d": "W_dec",
              "b_enc": "b_enc", "benc": "b_enc", "b_e": "b_enc", "b_dec": "b_dec", "bdec": "b_dec", "b_d": "b_dec",
              "threshold": "threshold"}


def gemma_2_transcoder_config(repo_id: str, folder: str) -> dict[str, Any]:
    """SAELens' cfg dict for a Gemma Scope transcoder: model and width from the repository id,
    d_sae and layer from the folder (`layer_{n}/width_{w}k/...`)."""
    d_sae = next((width for key, width in _WIDTHS.items() if key in folder), None)
    if d_sae is None:
        match = re.search(r"width_(\d+)k", folder)
        if match is None:
            raise FormatError(f"{repo_id}/{folder}: no 'width_<n>k' in the folder name to read d_sae from.")
        d_sae = int(match.group(1)) * 1024
    match = re.search(r"layer_(\d+)", folder) or re.search(r"layer_(\d+)", repo_id)
    if match is None:
        raise FormatError(f"{repo_id}/{folder}: no 'layer_<n>' in the folder or repository name.")
    layer = int(match.group(1))
    model = next((info for key, info in _GEMMA_2_MODELS.items() if key in repo_id), None)
    if model is None:
        raise FormatError(f"{repo_id}: cannot tell the Gemma 2 model (2b, 9b, 27b, -it) from the repository id.")
    name, d_model = model
    return {
        "architecture": "jumprelu_transcoder",
        "d_in": d_model,
        "d_out": d_model,
        "d_sae": d_sae,
        "dtype": "float32",
        "normalize_activations": "none",
        "model_name": name,
        "hook_name": f"blocks.{layer}.ln2.hook_normalized",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "hook_head_index": None,
        "hook_head_index_out": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
    }


def convert_gemma_2_transcoder(src: Source) -> Converted:
    """JumpReLU transcoders read as float32 from `{path}/params.npz` (any other arrays are ignored);
    the widths are the arrays' (SAELens reads the same ones off the names)."""
    npz = src.file(GEMMA_SCOPE_FILENAME)
    raw = read_npz(npz)
    check_tensor_dtypes(raw, source=str(npz), what="array")
    params = {_NPZ_NAMES[k.lower()]: np.asarray(v, np.float32) for k, v in raw.items() if k.lower() in _NPZ_NAMES}
    return build(gemma_2_transcoder_config(src.repo_id, src.folder) | widths(params, npz), params, src, str(npz))


# --------------------------------------------------------------------------- mwhanna_transcoder
def mwhanna_transcoder_config(src: Source) -> dict[str, Any]:
    """SAELens' cfg dict from the repository's `wandb-config.yaml` (or its misspelling
    `wanb-config.yaml`) and `config.yaml` (absent in some repositories: the Qwen3 size is then
    read from the repository id); the layer is the file name's last `_`-separated number."""
    stem = src.folder.removesuffix(".safetensors")
    try:
        layer = int(stem.split("_")[-1])
    except ValueError:
        raise FormatError(f"{src.repo_id}/{src.folder}: expected a file named like 'layer_<n>.safetensors'.") from None
    wandb_path = src.repo_file("wandb-config.yaml", optional=True) or src.repo_file("wanb-config.yaml")
    base_path = src.repo_file("config.yaml", optional=True)
    if base_path is not None:
        model_name = yaml_field(read_yaml(base_path), "model_name", source=base_path)
    else:
        match = re.search(r"qwen3-(\d+(?:\.\d+)?)b", src.repo_id)
        if match is None:
            raise FormatError(f"{src.repo_id}: no config.yaml, and no 'qwen3-<size>b' in the repository id.")
        model_name = f"Qwen/Qwen3-{match.group(1)}B"
    wandb = read_yaml(wandb_path)
    d_model = yaml_field(wandb, "d_model", "value", source=wandb_path)
    return {
        "architecture": "transcoder",
        "d_in": d_model,
        "d_out": d_model,
        "d_sae": yaml_field(wandb, "d_feature", "value", source=wandb_path),
        "dtype": "float32",
        "normalize_activations": "none",
        "model_name": model_name,
        "hook_name": f"blocks.{layer}.mlp.hook_in",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": yaml_field(wandb, "batch_size", "value", source=wandb_path),
        "apply_b_dec_to_input": False,
        "model_from_pretrained_kwargs": {"fold_ln": False},
    }


def convert_mwhanna_transcoder(src: Source) -> Converted:
    """The file's tensors with W_enc stored (d_sae, d_in) and transposed on load."""
    cfg_dict = mwhanna_transcoder_config(src)
    path = src.repo_file(src.folder)
    params = dict(read_safetensors(path))
    params["W_enc"] = np.ascontiguousarray(tensor(params, "W_enc", path).T)
    return build(cfg_dict, params, src, str(path))


# --------------------------------------------------------------------------- mntss_clt_layer_transcoder
def convert_mntss_clt_layer_transcoder(src: Source) -> Converted:
    """Layer `path` of a cross-layer transcoder as a single-layer transcoder: encoder from
    `W_enc_{n}.safetensors` (W_enc_{n} stored (d_sae, d_in), b_enc_{n}, b_dec_{n}), decoder the sum
    over target layers of `W_dec_{n}` (d_sae, n_targets, d_out). As SAELens warns, this finds
    feature activations; it does not reconstruct the layer's output."""
    n = src.folder
    config_path = src.repo_file("config.yaml")
    info = read_yaml(config_path)
    enc_path = src.repo_file(f"W_enc_{n}.safetensors")
    dec_path = src.repo_file(f"W_dec_{n}.safetensors")
    enc, dec = read_safetensors(enc_path), read_safetensors(dec_path)
    b_dec, b_enc = tensor(enc, f"b_dec_{n}", enc_path), tensor(enc, f"b_enc_{n}", enc_path)
    W_dec = tensor(dec, f"W_dec_{n}", dec_path)
    if W_dec.ndim != 3:
        raise FormatError(f"{dec_path}: W_dec_{n} has shape {W_dec.shape}; expected (d_sae, n_target_layers, d_out).")
    cfg_dict = {
        "architecture": "transcoder",
        "d_in": int(b_dec.shape[0]),
        "d_out": int(b_dec.shape[0]),
        "d_sae": int(b_enc.shape[0]),
        "dtype": "float32",
        "normalize_activations": "none",
        "model_name": yaml_field(info, "model_name", source=config_path),
        "hook_name": f"blocks.{n}.{yaml_field(info, 'feature_input_hook', source=config_path)}",
        "hook_name_out": f"blocks.{n}.{yaml_field(info, 'feature_output_hook', source=config_path)}",
        "apply_b_dec_to_input": False,
        "model_from_pretrained_kwargs": {"fold_ln": False},
    }
    # SAELens casts each tensor to the requested dtype, then sums (torch accumulates 16-bit floats
    # in float32 and rounds once).
    W_dec = cast_params({"W_dec": W_dec}, src.dtype, source=str(dec_path))["W_dec"]
    acc = np.float64 if W_dec.dtype == np.float64 else np.float32
    params = {
        "W_enc": np.ascontiguousarray(tensor(enc, f"W_enc_{n}", enc_path).T),
        "b_enc": b_enc,
        "b_dec": b_dec,
        "W_dec": torch_order_sum(W_dec.astype(acc)).astype(W_dec.dtype),
    }
    return build(cfg_dict, params, src, str(enc_path))


def torch_order_sum(a: np.ndarray) -> np.ndarray:
    """a.sum(axis=1) for a (rows, n, cols) array, added in the order torch's CPU kernel adds
    `tensor.sum(dim=1)` when cols is a multiple of 64 (as released widths are): a cascade whose
    first level sums runs of 16 (more for n > 2**16) and carries them up (multi_row_sum in
    aten/src/ATen/native/cpu/SumKernel.cpp). Any other order differs in the last bits."""
    n = a.shape[1]
    level_power = max(4, (n - 1).bit_length() // 4)  # CeilLog2(n) / num_levels
    step, mask = 1 << level_power, (1 << level_power) - 1
    acc = [np.zeros((a.shape[0], a.shape[2]), a.dtype) for _ in range(4)]
    i = 0
    while i + step <= n:
        for _ in range(step):
            acc[0] = acc[0] + a[:, i]
            i += 1
        for level in range(1, 4):
            acc[level] = acc[level] + acc[level - 1]
            acc[level - 1] = np.zeros_like(acc[level - 1])
            if i & (mask << (level * level_power)):
                break
    for j in range(i, n):
        acc[0] = acc[0] + a[:, j]
    for level in range(1, 4):
        acc[0] = acc[0] + acc[level]
    return acc[0]
