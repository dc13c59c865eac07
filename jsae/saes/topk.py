"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

h = x̃ W_enc + b_enc (times ‖W_dec rows‖ when rescale_acts_by_decoder_norm); f keeps the
k largest entries of h, relu'd; decode divides f by the norms first when rescaling.
"""

from __future__ import annotations

import dataclasses

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import (
    Array,
    BaseSAEModule,
    decoder_row_norms,
    fold_decoder_norms,
    topk_scatter,
    zeros,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKSAEConfig(SAEConfig):
    """Config of a TopK SAE.

    Attributes:
        k: latents kept per token.
        rescale_acts_by_decoder_norm: select and scale latents as if the decoder had unit rows.
    """

    architecture = "topk"

    k: int = 100
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
            raise ConfigError(f"TopKSAEConfig.k must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}.")


class TopKSAE(BaseSAEModule):
    cfg: TopKSAEConfig

    def extra_params(self) -> None:
        self.b_enc = self.param("b_enc", zeros, (self.cfg.d_sae,), self.cfg.jnp_dtype)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * decoder_row_norms(self.W_dec)
        return topk_scatter(hidden_pre, self.cfg.k), hidden_pre

    def decode_linear(self, feature_acts: Array) -> Array:
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts * (1 / decoder_row_norms(self.W_dec))
        return feature_acts @ self.W_dec + self.b_dec


def fold_W_dec_norm(params: dict, cfg: TopKSAEConfig) -> dict:
    """Only exact when rescale_acts_by_decoder_norm (otherwise the top-k choice would change)."""
    if not cfg.rescale_acts_by_decoder_norm:
        raise ConfigError(
            "fold_W_dec_norm on a TopK SAE needs rescale_acts_by_decoder_norm=True: without it "
            "folding the decoder norms changes which latents are in the top k."
        )
    return fold_decoder_norms(params, scale_keys=("b_enc",))
