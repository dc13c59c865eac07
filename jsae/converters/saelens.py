"""SAELens folders and EleutherAI sparsify folders as released on the Hub (`sae_lens`, `sparsify`).

`sae_lens` (sae_lens_huggingface_loader): `{path}/cfg.json`, `{path}/sae_weights.safetensors` and
an optional `{path}/sparsity.safetensors`, any SAELens version. `sparsify` (sparsify_huggingface_loader):
`{path}/cfg.json` + `{path}/sae.safetensors` from EleutherAI's sparsify.
"""

from __future__ import annotations

from jsae.cfg_json import CFG_FILENAME
from jsae.converters._source import Converted, Source
from jsae.converters.folders import GEMMA_SCOPE_FILENAME, SPARSIFY_WEIGHTS_FILENAME

WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"


def convert_sae_lens(src: Source) -> Converted:
    from jsae import io  # jsae.io imports this package

    cfg_path = src.file(CFG_FILENAME)
    src.file(WEIGHTS_FILENAME)
    src.file(SPARSITY_FILENAME, optional=True)
    cfg, params, sparsity = io.read_folder(cfg_path.parent, dtype=src.dtype, overrides=src.overrides)
    return Converted(cfg, params, sparsity)


def convert_sparsify(src: Source) -> Converted:
    from jsae import io

    src.file(CFG_FILENAME)
    weights = src.file(SPARSIFY_WEIGHTS_FILENAME)
    cfg, params, sparsity = io.read_folder(weights.parent, dtype=src.dtype, overrides=src.overrides)
    return Converted(cfg, params, sparsity)


def detect_hub_format(src: Source) -> str:
    """The converter for an 'owner/repo' id outside the registry, from the files its folder holds."""
    cfg_path = src.file(CFG_FILENAME, optional=True)
    if cfg_path is None and src.file(GEMMA_SCOPE_FILENAME, optional=True) is not None:
        return "gemma_2"
    if (
        cfg_path is not None
        and src.file(WEIGHTS_FILENAME, optional=True) is None
        and src.file(SPARSIFY_WEIGHTS_FILENAME, optional=True) is not None
    ):
        return "sparsify"
    return "sae_lens"
