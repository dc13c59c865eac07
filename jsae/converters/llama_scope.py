"""Llama Scope releases (OpenMOSS): `llama_scope` and `llama_scope_r1_distill`, JumpReLU SAEs.

Both were trained on inputs scaled to norm sqrt(d_in) ("expected_average_only_in"); the
registry's norm_scaling_factor is folded into the weights after loading, as SAELens does.
Configs and files follow sae_lens/loading/pretrained_sae_loaders.py (get_llama_scope_config_from_hf,
llama_scope_sae_huggingface_loader and their r1_distill counterparts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae.config import DTYPES
from jsae.converters._source import Converted, Source, build, read_json_object, require
from jsae.tensors import cast_params, read_safetensors

_LINEAR_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")


# What both Llama Scope loaders of SAELens write into the config besides the widths, dtype and hook.
_SHARED_CFG = {
    "model_name": "meta-llama/Llama-3.1-8B",
    "hook_head_index": None,
    "activation_fn": "relu",
    "prepend_bos": True,
    "dataset_path": "cerebras/SlimPajama-627B",
    "context_size": 1024,
    "apply_b_dec_to_input": False,
    "normalize_activations": "expected_average_only_in",
}


def _read_weights(src: Source, name: str, dtype: str, extra: tuple[str, ...] = ()) -> tuple[Path, dict[str, np.ndarray]]:
    """(file, params) of the release's safetensors file `name`: its nn.Linear encoder / decoder weights
    in SAELens' x @ W layout and the `extra` tensors as stored, all cast to `dtype`."""
    weights = src.file(name)
    state = read_safetensors(weights)
    keys = (*_LINEAR_KEYS, *extra)
    require(state, keys, source=weights, what="tensor")
    state = cast_params({k: state[k] for k in keys}, dtype, source=str(weights))
    params = {
        "W_enc": state["encoder.weight"].T,
        "W_dec": state["decoder.weight"].T,
        "b_enc": state["encoder.bias"],
        "b_dec": state["decoder.bias"],
    }
    return weights, params | {k: state[k] for k in extra}


def convert_llama_scope(src: Source) -> Converted:
    """`{path}/hyperparams.json` + `{path}/checkpoints/final.safetensors`; one scalar JumpReLU threshold.

    The threshold applies to inputs scaled by s = sqrt(d_model) / dataset_average_activation_norm.in,
    so it is stored multiplied by s: folding s into W_enc (from the registry) then leaves it right.
    """
    hyper_path = src.file("hyperparams.json")
    hyper = read_json_object(hyper_path)
    require(hyper, ("d_model", "d_sae", "hook_point_in", "jump_relu_threshold", "dataset_average_activation_norm"),
            source=hyper_path)
    d_in = hyper["d_model"]
    norm_scaling_factor = d_in**0.5 / hyper["dataset_average_activation_norm"]["in"]
    threshold = hyper["jump_relu_threshold"] * norm_scaling_factor
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": hyper["d_sae"],
        "dtype": "bfloat16",
        "hook_name": hyper["hook_point_in"],
    } | _SHARED_CFG
    dtype = src.overrides.get("dtype", cfg["dtype"])
    weights, params = _read_weights(src, "checkpoints/final.safetensors", dtype)
    # ones(d_sae) * threshold as torch computes it: in float64 for float64, else in float32, then rounded
    compute = np.float64 if dtype == "float64" else np.float32
    params["threshold"] = np.full((hyper["d_sae"],), compute(threshold), compute).astype(DTYPES[dtype])
    return build(src, cfg, params, source=str(weights))


def convert_llama_scope_r1_distill(src: Source) -> Converted:
    """`{path}/config.json` (d_model, expansion_factor, hook_point_in) + `{path}/sae_weights.safetensors`
    with nn.Linear weights and a per-latent `log_jumprelu_threshold`."""
    cfg_path = src.file("config.json")
    raw = read_json_object(cfg_path)
    require(raw, ("d_model", "expansion_factor", "hook_point_in"), source=cfg_path)
    d_in = raw["d_model"]
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_in * raw["expansion_factor"],
        "dtype": "float32",
        "hook_name": raw["hook_point_in"],
    } | _SHARED_CFG
    dtype = src.overrides.get("dtype", cfg["dtype"])
    weights, params = _read_weights(src, "sae_weights.safetensors", dtype, ("log_jumprelu_threshold",))
    log_threshold = params.pop("log_jumprelu_threshold")
    # exp in float64, rounded once: the correctly rounded threshold. torch's vectorised float32 exp is
    # accurate to about 1 ulp, so SAELens' threshold can differ from this one in the last bits.
    params["threshold"] = np.exp(log_threshold.astype(np.float64)).astype(log_threshold.dtype)
    return build(src, cfg, params, source=str(weights))
