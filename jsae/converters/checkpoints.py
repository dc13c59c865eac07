"""Releases stored as torch checkpoints: connor_rob_hook_z, dictionary_learning_1, deepseek_r1, qwen_scope.

The files are read without torch (`_torch_pickle`); configs and tensor names follow SAELens'
loaders and config getters of the same names in sae_lens/loading/pretrained_sae_loaders.py.
Widths are read off the tensors (SAELens hard-codes some: deepseek_r1's 4096 x 65536, qwen_scope's
per-model d_in and the width in the repo name; the released files have exactly those shapes).
"""

from __future__ import annotations

import re

import numpy as np

from jsae._errors import FormatError
from jsae.converters._source import Converted, Source, build, read_json_object, require
from jsae.converters._torch_pickle import tensor_dict


def convert_connor_rob_hook_z(src: Source) -> Converted:
    """Attention-output SAEs of Kissane, Krzyzanowski et al. (gpt2-small hook_z, heads concatenated).

    Files: the registry path is the checkpoint (`*.pt`, a state dict W_enc, W_dec, b_enc, b_dec in
    SAELens' layout) and its config sits beside it as `<name>_cfg.json` (act_size, dict_size, act_name).
    """
    cfg_path = src.repo_file(src.folder.split(".pt")[0] + "_cfg.json")
    raw = read_json_object(cfg_path)
    require(raw, ("act_size", "dict_size", "act_name"), source=cfg_path)
    cfg = {
        "architecture": "standard",
        "d_in": raw["act_size"],
        "d_sae": raw["dict_size"],
        "dtype": "float32",
        "model_name": "gpt2-small",
        "hook_name": raw["act_name"],
        "hook_head_index": None,
        "activation_fn": "relu",
        "apply_b_dec_to_input": True,
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "context_size": 128,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
    }
    weights = src.repo_file(src.folder)
    state = tensor_dict(weights)
    require(state, ("W_enc", "W_dec", "b_enc", "b_dec"), source=weights, what="tensor")
    params = {k: state[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    return build(src, cfg, params, source=str(weights))


#: dictionary_learning's dict_class -> (SAELens architecture, apply_b_dec_to_input).
_DICTIONARY_LEARNING_CLASSES = {
    "AutoEncoder": ("standard", True),
    "AutoEncoderTopK": ("standard", True),  # becomes topk through activation_fn, as in SAELens
    "GatedAutoEncoder": ("gated", True),
    "MatryoshkaBatchTopKSAE": ("jumprelu", True),
    "BatchTopKSAE": ("jumprelu", True),
    # dictionary_learning's JumpReluAutoEncoder does not subtract b_dec before encoding
    "JumpReluAutoEncoder": ("jumprelu", False),
}


def convert_dictionary_learning_1(src: Source) -> Converted:
    """SAEs trained with dictionary_learning (SAEBench sweeps, andyrdt): `{path}/config.json` + `{path}/ae.pt`.

    config.json's `trainer` block names the class, sizes, layer and model; ae.pt is the module's
    state dict (nn.Linear weights `encoder.weight` (d_sae, d_in), `decoder.weight` (d_in, d_sae), or
    SAELens-style `W_enc` / `W_dec`). BatchTopK and Matryoshka SAEs load as JumpReLU with their
    global threshold on every latent, as SAELens loads them; an unknown class loads as standard,
    as in SAELens.
    """
    cfg_path = src.file("config.json")
    raw = read_json_object(cfg_path)
    require(raw, ("trainer", "buffer"), source=cfg_path)
    trainer, buffer = raw["trainer"], raw["buffer"]
    require(trainer, ("dict_class", "layer", "activation_dim", "dict_size", "lm_name"), source=f"{cfg_path}: trainer")
    architecture, apply_b_dec = _DICTIONARY_LEARNING_CLASSES.get(trainer["dict_class"], ("standard", True))
    topk = trainer["dict_class"] == "AutoEncoderTopK"
    cfg = {
        "architecture": architecture,
        "d_in": trainer["activation_dim"],
        "d_sae": trainer["dict_size"],
        "dtype": "float32",
        "model_name": trainer["lm_name"].split("/")[-1],
        "hook_name": f"blocks.{trainer['layer']}.hook_resid_post",
        "hook_head_index": None,
        "activation_fn": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": trainer["k"]} if topk else {},
        "apply_b_dec_to_input": apply_b_dec,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": buffer.get("ctx_len"),
        "normalize_activations": "none",
        "neuronpedia_id": None,
    }
    weights = src.file("ae.pt")
    state = tensor_dict(weights)
    w_enc = state["W_enc"] if "W_enc" in state else _transposed(state, "encoder.weight", weights)
    w_dec = state["W_dec"] if "W_dec" in state else _transposed(state, "decoder.weight", weights)
    b_dec = next((state[k] for k in ("b_dec", "bias", "decoder_bias") if k in state), None)
    if b_dec is None:
        raise FormatError(f"{weights}: no decoder bias ('b_dec', 'bias' or 'decoder_bias'; found {sorted(state)}).")
    params = {"W_enc": w_enc, "W_dec": w_dec, "b_dec": b_dec}
    for name, key in (("b_enc", "encoder.bias"), ("b_enc", "b_enc"), ("b_mag", "mag_bias"),
                      ("b_gate", "gate_bias"), ("r_mag", "r_mag")):
        if key in state:
            params[name] = state[key]
    # AutoEncoderTopK saves a threshold too, but encodes with a per-token top-k
    if "threshold" in state and architecture == "jumprelu":
        threshold = state["threshold"]
        if threshold.ndim == 0:  # one global threshold (BatchTopK): every latent gets it, in float32
            threshold = np.full((w_enc.shape[1],), np.float32(threshold.item()), np.float32)
        params["threshold"] = threshold
    return build(src, cfg, params, source=str(weights))


def _transposed(state: dict[str, np.ndarray], key: str, source) -> np.ndarray:
    require(state, (key,), source=source, what="tensor")
    return state[key].T


def convert_deepseek_r1(src: Source) -> Converted:
    """qresearch's DeepSeek-R1-Distill-Llama-8B SAE: the registry path is a `*.pt` state dict of nn.Linear
    encoder / decoder weights; b_dec is not subtracted from the input."""
    match = re.search(r"l(\d+)", src.folder)
    if match is None:
        raise FormatError(f"{src.repo_id}/{src.folder}: no layer number ('l<N>') in the file name.")
    weights = src.repo_file(src.folder)
    state = tensor_dict(weights)
    require(state, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), source=weights, what="tensor")
    d_sae, d_in = state["encoder.weight"].shape
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "bfloat16",
        "context_size": 1024,
        "model_name": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        "hook_name": f"blocks.{int(match.group(1))}.hook_resid_post",
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "lmsys/lmsys-chat-1m",
        "activation_fn": "relu",
        "normalize_activations": "none",
        "apply_b_dec_to_input": False,
    }
    params = {
        "W_enc": state["encoder.weight"].T,
        "W_dec": state["decoder.weight"].T,
        "b_enc": state["encoder.bias"],
        "b_dec": state["decoder.bias"],
    }
    return build(src, cfg, params, source=str(weights))


#: Qwen Scope: the model key in a repo name ("SAE-Res-{key}-W{N}K-L0_{K}") -> Hugging Face model id.
QWEN_SCOPE_MODELS = {
    "Qwen3-1.7B-Base": "Qwen/Qwen3-1.7B-Base",
    "Qwen3-8B-Base": "Qwen/Qwen3-8B-Base",
    "Qwen3-30B-A3B-Base": "Qwen/Qwen3-30B-A3B-Base",
    "Qwen3.5-2B-Base": "Qwen/Qwen3.5-2B-Base",
    "Qwen3.5-9B-Base": "Qwen/Qwen3.5-9B-Base",
    "Qwen3.5-27B": "Qwen/Qwen3.5-27B",
    "Qwen3.5-35B-A3B-Base": "Qwen/Qwen3.5-35B-A3B-Base",
}


def convert_qwen_scope(src: Source) -> Converted:
    """Qwen Scope TopK SAEs: `layer{n}.sae.pt` holds W_enc (d_sae, d_in), W_dec (d_in, d_sae), b_enc, b_dec.

    k comes from the repo name (`...-L0_{k}`); b_dec is not subtracted from the input.
    """
    layer = re.search(r"layer(\d+)\.sae\.pt", src.folder)
    repo = re.search(r"SAE-Res-(.+)-W(\d+)K-L0_(\d+)", src.repo_id)
    if layer is None or repo is None:
        raise FormatError(
            f"{src.repo_id}/{src.folder}: expected a Qwen Scope file 'layer<N>.sae.pt' in a repo named "
            "'SAE-Res-<model>-W<width>K-L0_<k>'."
        )
    if repo.group(1) not in QWEN_SCOPE_MODELS:
        raise FormatError(f"{src.repo_id}: unknown Qwen Scope base model {repo.group(1)!r} "
                          f"(known: {sorted(QWEN_SCOPE_MODELS)}).")
    weights = src.repo_file(src.folder)
    state = tensor_dict(weights)
    require(state, ("W_enc", "W_dec", "b_enc", "b_dec"), source=weights, what="tensor")
    d_sae, d_in = state["W_enc"].shape
    k = int(repo.group(3))
    cfg = {
        "architecture": "topk",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": k},
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "context_size": 1024,
        "model_name": QWEN_SCOPE_MODELS[repo.group(1)],
        "hook_name": f"blocks.{int(layer.group(1))}.hook_resid_post",
        "hf_hook_name": f"model.layers.{int(layer.group(1))}",
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": None,  # trained on Qwen's in-house data
        "normalize_activations": "none",
        "apply_b_dec_to_input": False,
    }
    params = {
        "W_enc": np.ascontiguousarray(state["W_enc"].T),
        "W_dec": np.ascontiguousarray(state["W_dec"].T),
        "b_enc": state["b_enc"],
        "b_dec": state["b_dec"],
    }
    return build(src, cfg, params, source=str(weights))
