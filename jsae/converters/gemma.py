"""Gemma Scope releases: `gemma_2` (Gemma Scope, `params.npz`) and `gemma_3` (Gemma Scope 2, safetensors).

Configs follow sae_lens/loading/pretrained_sae_loaders.py (get_gemma_2_config_from_hf,
get_gemma_3_config_from_hf and their loaders): model, hook and widths come from the repository
and folder names (and Gemma Scope 2's `config.json` where the folder has one); tensor shapes are
read off the files.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jsae._errors import FormatError
from jsae.converters._source import Converted, Source, build, read_json_object
from jsae.converters.folders import GEMMA_SCOPE_FILENAME, read_npz
from jsae.tensors import cast_params, read_safetensors, upgrade_legacy_tensors

_GEMMA_2_MODELS = {  # repo-id fragment -> (model name, residual width); first match wins
    "2b-it": ("gemma-2-2b-it", 2304),
    "9b-it": ("gemma-2-9b-it", 3584),
    "27b-it": ("gemma-2-27b-it", 4608),
    "2b": ("gemma-2-2b", 2304),
    "9b": ("gemma-2-9b", 3584),
    "27b": ("gemma-2-27b", 4608),
}


def _layer(folder: str, where: str) -> int:
    match = re.search(r"layer_(\d+)", folder)
    if match is None:
        raise FormatError(f"{where}: no layer number ('layer_<N>') in the folder name {folder!r}.")
    return int(match.group(1))


def gemma_2_hook(repo_id: str, folder: str) -> str:
    """The TransformerLens hook a Gemma Scope SAE reads, from its repo and folder names."""
    layer = 0 if "embedding" in folder and "layer_" not in folder else _layer(folder, repo_id)
    if "res" in repo_id:
        return "hook_embed" if "embedding" in folder else f"blocks.{layer}.hook_resid_post"
    if "mlp" in repo_id:
        return f"blocks.{layer}.hook_mlp_out"
    if "att" in repo_id:
        return f"blocks.{layer}.attn.hook_z"
    raise FormatError(f"{repo_id}: cannot tell the hook (res, mlp or att) from the repository name.")


def convert_gemma_2(src: Source) -> Converted:
    """`{path}/params.npz` with w_enc, w_dec, b_enc, b_dec, threshold: JumpReLU, no b_dec on the input.

    Embedding SAEs were trained on embeddings scaled by sqrt(d_model): W_enc / sqrt(d_in) and
    W_dec * sqrt(d_in) make them read unscaled embeddings, as SAELens loads them.
    """
    model = next((info for key, info in _GEMMA_2_MODELS.items() if key in src.repo_id), None)
    if model is None:
        raise FormatError(f"{src.repo_id}: not a Gemma Scope repository name (expected a 2b / 9b / 27b model in it).")
    npz = src.file(GEMMA_SCOPE_FILENAME)
    raw = read_npz(npz)
    params = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    if "W_enc" not in params or params["W_enc"].ndim != 2:
        raise FormatError(f"{npz}: expected a 2-D array 'w_enc' (d_in, d_sae), found {sorted(raw)}.")
    params = cast_params(upgrade_legacy_tensors(params, source=str(npz)), "float32", source=str(npz))
    d_in, d_sae = params["W_enc"].shape
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "model_name": model[0],
        "hook_name": gemma_2_hook(src.repo_id, src.folder),
        "hook_head_index": None,
        "activation_fn": "relu",
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        "normalize_activations": None,
    }
    if "embedding" in src.folder:
        scale = np.float32(np.sqrt(d_in))
        params["W_enc"] = params["W_enc"] / scale
        params["W_dec"] = params["W_dec"] * scale
    return build(src, cfg, params, source=str(npz))


def _gemma_3_raw_config(src: Source) -> dict[str, Any]:
    """Gemma Scope 2's `{path}/config.json`, or what SAELens infers when the folder has none."""
    path = src.file("config.json", optional=True)
    if path is not None:
        return read_json_object(path)
    folder = src.folder
    layer = _layer(folder, f"{src.repo_id}/{folder}")
    coder = "transcoder" in folder or "clt" in folder
    if coder:
        hook_in = f"model.layers.{layer}.pre_feedforward_layernorm.output"
        hook_out = f"model.layers.{layer}.post_feedforward_layernorm.output"
    elif "resid_post" in folder:
        hook_in, hook_out = f"model.layers.{layer}.output", None
    elif "attn_out" in folder:
        hook_in, hook_out = f"model.layers.{layer}.self_attn.o_proj.input", None
    elif "mlp_out" in folder:
        hook_in, hook_out = f"model.layers.{layer}.post_feedforward_layernorm.output", None
    else:
        raise FormatError(f"{src.repo_id}/{folder}: cannot tell the hook type from the folder name.")
    raw: dict[str, Any] = {
        "architecture": "jump_relu",
        "model_name": src.repo_id.replace("gemma-scope-2", "gemma-3"),
        "hf_hook_point_in": hook_in,
    }
    if coder:
        raw["affine_connection"] = "affine" in folder
    if hook_out is not None:
        raw["hf_hook_point_out"] = hook_out
    return raw


def convert_gemma_3(src: Source) -> Converted:
    """Gemma Scope 2: `{path}/params.safetensors` (w_enc, w_dec, b_enc, b_dec, threshold, and for affine
    transcoders affine_skip_connection (d_in, d_out)) plus an optional `{path}/config.json`.

    SAEs on resid_post / attn_out (the attention's o_proj input, TransformerLens' hook_z flattened) /
    mlp_out load as JumpReLU; transcoders (mlp_in -> mlp_out) as jumprelu_transcoder, or
    jumprelu_skip_transcoder when config.json's affine_connection is true. Cross-layer transcoder
    files (`<folder>/<name>.safetensors`, w_dec (d_sae, n_layers, d_out)) load with their decoders
    summed over the layers, as SAELens loads them.
    """
    from jsae.converters import unsupported

    raw = _gemma_3_raw_config(src)
    if raw.get("architecture") != "jump_relu":
        raise unsupported(src, f"Gemma Scope 2 config.json has architecture {raw.get('architecture')!r}; "
                               "jsae (like SAELens) reads 'jump_relu' only.")
    folder = src.folder
    layer = _layer(folder, f"{src.repo_id}/{folder}")
    coder = "transcoder" in folder or "clt" in folder
    if "resid_post" in folder:
        hook_name, hook_name_out = f"blocks.{layer}.hook_resid_post", None
    elif "attn_out" in folder:
        hook_name, hook_name_out = f"blocks.{layer}.attn.hook_z", None
    elif "mlp_out" in folder:
        hook_name, hook_name_out = f"blocks.{layer}.hook_mlp_out", None
    elif coder:
        hook_name, hook_name_out = f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out"
    else:
        raise FormatError(f"{src.repo_id}/{folder}: cannot tell the hook from the folder name.")
    if "clt" in folder:  # a cross-layer transcoder is one file per layer beside its siblings
        parent, _, name = folder.rpartition("/")
        weights = src.repo_file(f"{parent}/{name}.safetensors" if parent else f"{name}.safetensors")
        sum_layers = "clt" in parent
    else:
        weights = src.file("params.safetensors")
        sum_layers = False
    tensors = read_safetensors(weights)
    for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
        if key not in tensors:
            raise FormatError(f"{weights}: missing tensor {key!r} (found {sorted(tensors)}).")
    d_in, d_sae = tensors["w_enc"].shape
    model_name = raw.get("model_name")
    if not isinstance(model_name, str):
        raise FormatError(f"{src.repo_id}/{folder}/config.json: expected a string 'model_name', found {model_name!r}.")
    if "google" not in model_name:
        model_name = "google/" + model_name
    model_name = model_name.replace("-v3", "-3")
    if "270m" in model_name:  # the 270m model's Hub name has no -pt suffix
        model_name = model_name.replace("-pt", "")
    architecture = "jumprelu"
    if coder:
        architecture = "jumprelu_skip_transcoder" if raw.get("affine_connection", False) else "jumprelu_transcoder"
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hf_hook_name": raw.get("hf_hook_point_in"),
    }
    if hook_name_out is not None:
        cfg["hook_name_out"] = hook_name_out
        cfg["hf_hook_name_out"] = raw.get("hf_hook_point_out")
    if coder:
        cfg["d_out"] = tensors["w_dec"].shape[-1]
    # SAELens reads the file in the requested dtype and does the rest in it
    names = ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"]
    names += ["affine_skip_connection"] if "affine_skip_connection" in tensors else []
    state = cast_params({k: tensors[k] for k in names}, src.overrides.get("dtype", "float32"), source=str(weights))
    w_dec = state["w_dec"]
    if sum_layers:
        w_dec = w_dec.sum(axis=1, dtype=w_dec.dtype)
    params = {"W_enc": state["w_enc"], "W_dec": w_dec, "b_enc": state["b_enc"], "b_dec": state["b_dec"],
              "threshold": state["threshold"]}
    if "affine_skip_connection" in state:  # stored (d_in, d_out); W_skip is (d_out, d_in)
        params["W_skip"] = np.ascontiguousarray(state["affine_skip_connection"].T)
    return build(src, cfg, params, source=str(weights))
