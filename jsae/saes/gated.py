"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

gate = (x̃ W_enc + b_gate) > 0; magnitude = relu(x̃ (W_enc * exp(r_mag)) + b_mag); f = gate * magnitude.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsae.config import SAEConfig
from jsae.saes._base import Array, BaseSAEModule, fold_decoder_norms, zeros


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedSAEConfig(SAEConfig):
    """Config of a gated SAE (no fields beyond `SAEConfig`)."""

    architecture = "gated"


class GatedSAE(BaseSAEModule):
    cfg: GatedSAEConfig

    def extra_params(self) -> None:
        dtype = self.cfg.jnp_dtype
        d_sae = self.cfg.d_sae
        self.b_gate = self.param("b_gate", zeros, (d_sae,), dtype)
        self.r_mag = self.param("r_mag", zeros, (d_sae,), dtype)
        self.b_mag = self.param("b_mag", zeros, (d_sae,), dtype)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        gate = (sae_in @ self.W_enc + self.b_gate) > 0
        magnitude_pre = sae_in @ (self.W_enc * jnp.exp(self.r_mag)) + self.b_mag
        return gate.astype(sae_in.dtype) * jax.nn.relu(magnitude_pre), magnitude_pre


def fold_W_dec_norm(params: dict, cfg: GatedSAEConfig) -> dict:
    """Unit-norm decoder rows; W_enc, b_gate and b_mag scaled (r_mag rides on W_enc)."""
    return fold_decoder_norms(params, scale_keys=("b_gate", "b_mag"))
