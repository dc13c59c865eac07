"""Standard (ReLU) SAE: f = relu((x - b_dec) W_enc + b_enc)."""

from __future__ import annotations

import dataclasses

import jax

from jsae.config import SAEConfig
from jsae.saes._base import Array, BaseSAEModule, fold_decoder_norms, zeros


@dataclasses.dataclass(frozen=True, kw_only=True)
class StandardSAEConfig(SAEConfig):
    """Config of a standard ReLU SAE (no fields beyond `SAEConfig`)."""

    architecture = "standard"


class StandardSAE(BaseSAEModule):
    """ReLU SAE (Bricken et al. 2023, "Towards Monosemanticity")."""

    cfg: StandardSAEConfig

    def extra_params(self) -> None:
        self.b_enc = self.param("b_enc", zeros, (self.cfg.d_sae,), self.cfg.jnp_dtype)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        return jax.nn.relu(hidden_pre), hidden_pre


def fold_W_dec_norm(params: dict, cfg: StandardSAEConfig) -> dict:
    """Unit-norm decoder rows, scaling the encoder so outputs are unchanged."""
    return fold_decoder_norms(params, scale_keys=("b_enc",))
