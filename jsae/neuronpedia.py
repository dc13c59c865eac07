"""Links to an SAE's latents on Neuronpedia, for SAEs whose metadata carries a `neuronpedia_id`.

The URLs are the ones sae_lens builds (sae_lens/analysis/neuronpedia_integration.py:
`open_neuronpedia_feature_dashboard` and `get_neuronpedia_quick_list`); these functions return
them instead of opening a browser. `SAE.from_pretrained` sets `metadata.neuronpedia_id` from the
registry's `neuronpedia` field, e.g. "gpt2-small/8-res-jb" (model id / SAE set id).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable
from typing import Any

from jsae._errors import ConfigError

NEURONPEDIA_DOMAIN = "https://neuronpedia.org"

__all__ = ["NEURONPEDIA_DOMAIN", "neuronpedia_quick_list", "neuronpedia_url"]


def _neuronpedia_id(sae: Any) -> str:
    sae_id = sae.cfg.metadata.neuronpedia_id
    if not sae_id:
        raise ConfigError("metadata.neuronpedia_id: this SAE has none, so it has no Neuronpedia pages (SAEs from "
                          "SAE.from_pretrained carry one where the registry lists it; or set it with "
                          "sae.replace(cfg=sae.cfg.replace(metadata=sae.cfg.metadata.replace(neuronpedia_id=...))).")
    return str(sae_id)


def _latent(sae: Any, latent: Any) -> int:
    if isinstance(latent, bool) or not hasattr(latent, "__index__"):
        raise ConfigError(f"latent: expected an integer index, got {latent!r}.")
    index = int(latent.__index__())
    if not 0 <= index < sae.cfg.d_sae:
        raise ConfigError(f"latent: {index} is not a latent of this SAE (d_sae={sae.cfg.d_sae}: 0 to "
                          f"{sae.cfg.d_sae - 1}).")
    return index


def neuronpedia_url(sae: Any, latent: int) -> str:
    """The Neuronpedia page of one latent: f"{NEURONPEDIA_DOMAIN}/{neuronpedia_id}/{latent}".

    Raises ConfigError when the SAE's metadata has no neuronpedia_id or `latent` is not in [0, d_sae).
    """
    return f"{NEURONPEDIA_DOMAIN}/{_neuronpedia_id(sae)}/{_latent(sae, latent)}"


def neuronpedia_quick_list(sae: Any, latents: Iterable[int], name: str = "temporary_list") -> str:
    """A Neuronpedia quick-list URL showing `latents` side by side, named `name`.

    Each entry is {"modelId": metadata.model_name, "layer": the part of neuronpedia_id after its "/",
    "index": str(latent)}, JSON-encoded into the query as sae_lens encodes it.

    Raises ConfigError when neuronpedia_id is missing or not of the form "model/set", or a latent is
    not in [0, d_sae).
    """
    sae_id = _neuronpedia_id(sae)
    parts = sae_id.split("/")
    if len(parts) < 2:
        raise ConfigError(f"metadata.neuronpedia_id: expected 'model/set' (e.g. 'gpt2-small/8-res-jb'), got "
                          f"{sae_id!r}.")
    entries = [{"modelId": sae.cfg.metadata.model_name, "layer": parts[1], "index": str(_latent(sae, latent))}
               for latent in latents]
    return (f"{NEURONPEDIA_DOMAIN}/quick-list/?name={urllib.parse.quote(name)}"
            f"&features={urllib.parse.quote(json.dumps(entries))}")
