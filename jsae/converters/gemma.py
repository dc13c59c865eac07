"""Gemma Scope releases: `gemma_2` (Gemma Scope, `params.npz`).

The facts SAELens attaches (model, hook, widths) come from the repository and folder names, as
in sae_lens/loading/pretrained_sae_loaders.py (get_gemma_2_config_from_hf).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jsae.converters._source import Converted, Source
from jsae.converters.folders import GEMMA_SCOPE_FILENAME, read_gemma_scope

_GEMMA_2_MODELS = {  # repo-id fragment -> (model name, residual width); first match wins
    "2b-it": ("gemma-2-2b-it", 2304),
    "9b-it": ("gemma-2-9b-it", 3584),
    "27b-it": ("gemma-2-27b-it", 4608),
    "2b": ("gemma-2-2b", 2304),
    "9b": ("gemma-2-9b", 3584),
    "27b": ("gemma-2-27b", 4608),
}


def gemma_scope_config(repo_id: str, folder: str) -> dict[str, Any]:
    """Metadata SAELens attaches to Gemma Scope SAEs (model, hook, dataset), from repo and folder names."""
    model = next((info for key, info in _GEMMA_2_MODELS.items() if key in repo_id), None)
    match = re.search(r"layer_(\d+)", folder)
    layer = int(match.group(1)) if match else 0
    if "embedding" in folder:
        hook = "hook_embed"
    elif "res" in repo_id:
        hook = f"blocks.{layer}.hook_resid_post"
    elif "mlp" in repo_id:
        hook = f"blocks.{layer}.hook_mlp_out"
    elif "att" in repo_id:
        hook = f"blocks.{layer}.attn.hook_z"
    else:
        hook = None
    out: dict[str, Any] = {
        "hook_name": hook,
        "prepend_bos": True,
        "context_size": 1024,
        "dataset_path": "monology/pile-uncopyrighted",
    }
    if model is not None:
        out["model_name"] = model[0]
    return out


def convert_gemma_2(src: Source) -> Converted:
    npz = src.file(GEMMA_SCOPE_FILENAME)
    overrides = gemma_scope_config(src.repo_id, src.folder) | dict(src.overrides)
    cfg, params = read_gemma_scope(npz.parent, overrides=overrides | {"dtype": src.dtype}, file=npz)
    if "embedding" in src.folder:  # trained on embeddings scaled by sqrt(d_model)
        params = dict(params)
        params["W_enc"] = params["W_enc"] / np.sqrt(cfg.d_in).astype(params["W_enc"].dtype)
        params["W_dec"] = params["W_dec"] * np.sqrt(cfg.d_in).astype(params["W_dec"].dtype)
    return Converted(cfg, params)
