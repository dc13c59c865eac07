"""AbsTopK SAE (Zhu et al. 2026, "AbsTopK: Rethinking Sparse Autoencoders For Bidirectional
Features", arXiv:2510.00404; SAELens' sae_lens/saes/abstopk_sae.py).

h = x̃ W_enc + b_enc (times ‖W_dec rows‖ when rescale_acts_by_decoder_norm); f keeps the k
entries of h largest in magnitude with their sign (no ReLU), zeros elsewhere. Everything else
is TopK's: the same config fields, decoder and decoder-norm folding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsae.saes._base import Array, decoder_row_norms
from jsae.saes.topk import TopKSAE, TopKSAEConfig
from jsae.saes.topk import fold_W_dec_norm as fold_W_dec_norm  # same folding, same condition


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsTopKSAEConfig(TopKSAEConfig):
    """Config of an AbsTopK SAE (TopK's fields: k, rescale_acts_by_decoder_norm)."""

    architecture = "abstopk"


def abs_topk(values: Array, k: int) -> Array:
    """The k entries of the last axis largest in |value|, signed, zeros elsewhere."""
    _, indices = jax.lax.top_k(jnp.abs(values), k)
    kept = jnp.take_along_axis(values, indices, axis=-1)
    return jnp.put_along_axis(jnp.zeros_like(values), indices, kept, axis=-1, inplace=False)


class AbsTopKSAE(TopKSAE):
    cfg: AbsTopKSAEConfig

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * decoder_row_norms(self.W_dec)
        return abs_topk(hidden_pre, self.cfg.k), hidden_pre
