"""Goodfire's Llama SAEs (`goodfire`): one torch checkpoint per release, whose name is the
registry path (sae_lens/loading/pretrained_sae_loaders.py, get_goodfire_huggingface_loader).

The checkpoint is a state dict of nn.Linear layers (`encoder_linear`, `decoder_linear`), read
without torch; their weights are transposed into W_enc (d_in, d_sae) and W_dec (d_sae, d_in).
The configs are SAELens' fixed ones for the two released files, with the widths read off the
tensors (the same for the released files).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jsae._errors import ConfigError
from jsae.converters._source import Converted, Source
from jsae.converters._torch_pickle import tensor_dict
from jsae.converters.transcoders import build, tensor, widths

#: (repo id, file) -> the facts SAELens gives each release.
GOODFIRE_RELEASES: dict[tuple[str, str], dict[str, Any]] = {
    ("Goodfire/Llama-3.3-70B-Instruct-SAE-l50", "Llama-3.3-70B-Instruct-SAE-l50.pt"): {
        "d_in": 8192, "d_sae": 65536, "model_name": "meta-llama/Llama-3.3-70B-Instruct",
        "hook_name": "blocks.50.hook_resid_post"},
    ("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "Llama-3.1-8B-Instruct-SAE-l19.pth"): {
        "d_in": 4096, "d_sae": 65536, "model_name": "meta-llama/Llama-3.1-8B-Instruct",
        "hook_name": "blocks.19.hook_resid_post"},
}


def goodfire_config(repo_id: str, file: str) -> dict[str, Any]:
    facts = GOODFIRE_RELEASES.get((repo_id, file))
    if facts is None:
        raise ConfigError(f"{repo_id}/{file}: not a Goodfire SAE SAELens (and so jsae) has a config for; "
                          f"the known files are {sorted(GOODFIRE_RELEASES)}.")
    return {"architecture": "standard", **facts, "hook_head_index": None, "dataset_path": "lmsys/lmsys-chat-1m",
            "apply_b_dec_to_input": False}


def convert_goodfire(src: Source) -> Converted:
    cfg_dict = goodfire_config(src.repo_id, src.folder)
    path = src.repo_file(src.folder)
    raw = tensor_dict(path)
    params = {
        "W_enc": np.ascontiguousarray(tensor(raw, "encoder_linear.weight", path).T),
        "W_dec": np.ascontiguousarray(tensor(raw, "decoder_linear.weight", path).T),
        "b_enc": tensor(raw, "encoder_linear.bias", path),
        "b_dec": tensor(raw, "decoder_linear.bias", path),
    }
    shape = widths(params, path)
    return build(cfg_dict | {"d_in": shape["d_in"], "d_sae": shape["d_sae"]}, params, src, str(path))
