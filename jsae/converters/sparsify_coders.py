"""EleutherAI sparsify transcoder folders (`transcode` and/or `skip_connection` in cfg.json).

sparsify's SparseCoder (sparsify/sparse_coder.py) encodes topk(relu(x' @ encoder.weightᵀ +
encoder.bias)), with x' = x for a transcoder and x - b_dec otherwise, and outputs
acts @ W_dec + b_dec, plus x @ W_skipᵀ with a skip connection; W_dec is (num_latents, d_in)
and W_skip (d_in, d_in), so the output width is d_in. A transcoder is jsae's
`topk_transcoder` (with the skip connection `topk_skip_transcoder`). A skip connection without
`transcode` subtracts b_dec from the encoder's input but adds the skip of the raw input, which no
jsae architecture computes: it is an error, as is the `groupmax` activation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jsae._errors import FormatError
from jsae.cfg_json import CFG_FILENAME, config_from_dict
from jsae.config import SAELENS_FORMAT_VERSION, SAEConfig
from jsae.converters.folders import read_sparsify_tensors, sparsify_num_latents, sparsify_params
from jsae.tensors import cast_params, check_params


def sparsify_transcoder_hooks(hookpoint: str) -> tuple[str | None, str | None]:
    """(hook_name, hook_name_out) of a transcoder trained on sparsify hookpoint `hookpoint` (a module
    name): an MLP `layers.{n}.mlp` reads its input and writes hook_mlp_out; a block `layers.{n}` reads
    the residual stream before it and writes it after. Other modules have no TransformerLens name."""
    match = re.fullmatch(r"(?:model\.)?layers[._](\d+)([._]mlp)?", hookpoint)
    if match is None:
        return None, None
    n = match.group(1)
    if match.group(2):
        return f"blocks.{n}.mlp.hook_in", f"blocks.{n}.hook_mlp_out"
    return f"blocks.{n}.hook_resid_pre", f"blocks.{n}.hook_resid_post"


def read_sparsify_transcoder(path: Path, raw: Mapping[str, Any], *,
                             overrides: Mapping[str, Any] | None = None) -> tuple[SAEConfig, dict]:
    """A sparsify folder whose cfg.json (`raw`, already type-checked) sets transcode / skip_connection."""
    cfg_path = path / CFG_FILENAME
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise FormatError(f"{cfg_path}: sparsify activation {activation!r} has no jsae architecture (only 'topk'; "
                          "'groupmax' keeps one latent per group, which no jsae SAE computes).")
    if not raw.get("transcode"):
        raise FormatError(
            f"{cfg_path}: skip_connection without transcode (the encoder reads x - b_dec while the skip reads x) "
            "has no jsae architecture; jsae loads sparsify skip connections on transcoders."
        )
    skip = bool(raw.get("skip_connection"))
    weights_path, tensors = read_sparsify_tensors(path, ("W_skip",) if skip else ())
    d_in = int(raw["d_in"])
    hook_name, hook_name_out = sparsify_transcoder_hooks(path.name)
    cfg_dict = {
        "architecture": "topk_skip_transcoder" if skip else "topk_transcoder",
        "d_in": d_in,
        "d_out": d_in,
        "d_sae": sparsify_num_latents(raw),
        "k": int(raw["k"]),
        "dtype": str(np.dtype(tensors["encoder.weight"].dtype)),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook_name, "hook_name_out": hook_name_out, "hf_hook_name": path.name,
                     "hf_hook_name_out": path.name, "sae_lens_version": SAELENS_FORMAT_VERSION},
    }
    cfg = config_from_dict(cfg_dict, source=str(cfg_path), overrides=overrides)
    params = sparsify_params(tensors)
    if skip:
        params["W_skip"] = tensors["W_skip"]
    check_params(params, cfg, source=str(weights_path))
    return cfg, cast_params(params, cfg.dtype, source=str(weights_path))
