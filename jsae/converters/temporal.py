"""Temporal SAE releases (`temporal`): `{path}/conf.yaml` + `{path}/latest_ckpt.safetensors`
as canrager/temporalSAEs stores them (sae_lens/loading/pretrained_sae_loaders.py,
temporal_sae_huggingface_loader).

The checkpoint names the decoder `D` (d_sae, d_in), its bias `b`, the untied encoder `E`
(d_in, d_sae) and the attention layers `attn_layers.*`, which keep their names.
"""

from __future__ import annotations

import re
from typing import Any

from jsae._errors import FormatError
from jsae.converters._source import Converted, Source
from jsae.converters.transcoders import build, read_yaml, tensor, yaml_field
from jsae.tensors import read_safetensors


def temporal_config(src: Source) -> dict[str, Any]:
    """SAELens' cfg dict from conf.yaml; the layer comes from the folder (`.../layer_{n}/...`)."""
    path = src.file("conf.yaml")
    conf = read_yaml(path)
    match = re.search(r"layer_(\d+)", src.folder)
    if match is None:
        raise FormatError(f"{src.repo_id}/{src.folder}: no 'layer_<n>' in the folder name.")
    d_in = yaml_field(conf, "llm", "dimin", source=path)
    return {
        "architecture": "temporal",
        "hook_name": f"blocks.{int(match.group(1))}.hook_resid_post",
        "d_in": d_in,
        "d_sae": int(d_in * yaml_field(conf, "sae", "exp_factor", source=path)),
        **{key: yaml_field(conf, "sae", key, source=path)
           for key in ("n_heads", "n_attn_layers", "bottleneck_factor", "sae_diff_type", "kval_topk", "tied_weights")},
        "dtype": yaml_field(conf, "data", "dtype", source=path),
        "normalize_activations": "constant_scalar_rescale",
        "activation_normalization_factor": yaml_field(conf, "sae", "scaling_factor", source=path),
        "apply_b_dec_to_input": True,
    }


def convert_temporal(src: Source) -> Converted:
    cfg_dict = temporal_config(src)
    path = src.file("latest_ckpt.safetensors")
    raw = read_safetensors(path)
    params = {key: value for key, value in raw.items() if key.startswith("attn_layers.")}
    params["W_dec"] = tensor(raw, "D", path)
    params["b_dec"] = tensor(raw, "b", path)
    if "E" in raw:
        params["W_enc"] = raw["E"]
    return build(cfg_dict, params, src, str(path))
