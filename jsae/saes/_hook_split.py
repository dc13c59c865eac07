"""Each architecture's encoder split where SAELens places `hook_sae_acts_pre`.

SAELens' HookedSAETransformer lets a hook change the pre-activations before the activation
function runs, so splicing an SAE into a model needs the encoder in two parts:
`pre_activations(params, cfg, sae_in)` is the value `hook_sae_acts_pre` sees, and
`activate(params, cfg, hidden_pre, sae_in)` gives the latents `hook_sae_acts_post` sees.
Composed, they equal the module's `encode_prepared` latents (a test holds every entry to that).
TopK's rescale by decoder norms happens after the hook, as in sae_lens/saes/topk_sae.py; the
gated gate reads the prepared input, as in sae_lens/saes/gated_sae.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jsae.saes._base import Array, decoder_row_norms, topk_scatter
from jsae.saes.abstopk import abs_topk
from jsae.saes.jumprelu import jumprelu


class EncoderSplit(NamedTuple):
    pre_activations: Callable[[dict, object, Array], Array]
    activate: Callable[[dict, object, Array, Array], Array]


def _affine(params: dict, cfg, sae_in: Array) -> Array:
    return sae_in @ params["W_enc"] + params["b_enc"]


def _relu(params: dict, cfg, hidden_pre: Array, sae_in: Array) -> Array:
    return jax.nn.relu(hidden_pre)


def _jumprelu(params: dict, cfg, hidden_pre: Array, sae_in: Array) -> Array:
    return jumprelu(hidden_pre, params["threshold"])


def _rescaled(params: dict, cfg, hidden_pre: Array) -> Array:
    if cfg.rescale_acts_by_decoder_norm:
        return hidden_pre * decoder_row_norms(params["W_dec"])
    return hidden_pre


def _topk(params: dict, cfg, hidden_pre: Array, sae_in: Array) -> Array:
    return topk_scatter(_rescaled(params, cfg, hidden_pre), cfg.k)


def _abstopk(params: dict, cfg, hidden_pre: Array, sae_in: Array) -> Array:
    return abs_topk(_rescaled(params, cfg, hidden_pre), cfg.k)


def _gated_magnitude(params: dict, cfg, sae_in: Array) -> Array:
    return sae_in @ (params["W_enc"] * jnp.exp(params["r_mag"])) + params["b_mag"]


def _gated(params: dict, cfg, hidden_pre: Array, sae_in: Array) -> Array:
    gate = (sae_in @ params["W_enc"] + params["b_gate"]) > 0
    return gate.astype(sae_in.dtype) * jax.nn.relu(hidden_pre)


SPLITS: dict[str, EncoderSplit] = {
    "standard": EncoderSplit(_affine, _relu),
    "jumprelu": EncoderSplit(_affine, _jumprelu),
    "topk": EncoderSplit(_affine, _topk),
    "abstopk": EncoderSplit(_affine, _abstopk),
    "gated": EncoderSplit(_gated_magnitude, _gated),
    "transcoder": EncoderSplit(_affine, _relu),
    "skip_transcoder": EncoderSplit(_affine, _relu),
    "jumprelu_transcoder": EncoderSplit(_affine, _jumprelu),
    "jumprelu_skip_transcoder": EncoderSplit(_affine, _jumprelu),
    "topk_transcoder": EncoderSplit(_affine, _topk),
    "topk_skip_transcoder": EncoderSplit(_affine, _topk),
}


def encoder_split(architecture: str) -> EncoderSplit | None:
    """The split of `architecture`'s encoder, or None where jsae has none (the latents are then
    computed whole, and a hook cannot change the pre-activations)."""
    return SPLITS.get(architecture)
