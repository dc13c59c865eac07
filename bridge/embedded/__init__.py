"""The embedded default: a small language model and tokenizer shipped with jsae.

Trained by scripts/train_embedded_model.py on the CPython standard library and pydoc topics
(bridge.corpus), so the default run needs no download. See training_report.json for its
held-out loss.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
EMBEDDED_NAME = "jsae-embedded-stdlib"
MODEL_CONFIG = {
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "n_ctx": 128,
    "d_vocab": 4096,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "default_prepend_bos": True,
    "model_name": EMBEDDED_NAME,
}


def load_embedded_model(path: str | Path = EMBEDDED_DIR, device: str = "cpu"):
    """The embedded model as a float32 `HookedTransformer` with its tokenizer, offline."""
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        from jsae import MissingFileError

        raise MissingFileError(
            f"{weights}: the embedded model is missing; run scripts/train_embedded_model.py to build it."
        )
    config = json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = HookedTransformer(HookedTransformerConfig(**config, device=device), tokenizer=tokenizer)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(torch.device(device))
