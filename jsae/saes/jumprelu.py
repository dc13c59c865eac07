"""JumpReLU SAE: f = relu(h) * (h > threshold), h = (x - b_dec) W_enc + b_enc."""

from __future__ import annotations

import dataclasses

import jax

from jsae.config import SAEConfig
from jsae.saes._base import Array, BaseSAEModule, fold_decoder_norms, zeros


@dataclasses.dataclass(frozen=True, kw_only=True)
class JumpReLUSAEConfig(SAEConfig):
    """Config of a JumpReLU SAE (no fields beyond `SAEConfig`)."""

    architecture = "jumprelu"


def jumprelu(hidden_pre: Array, threshold: Array) -> Array:
    """relu(h) where h > threshold (strict), else 0 (Rajamanoharan et al. 2024, "Jumping Ahead")."""
    return jax.nn.relu(hidden_pre) * (hidden_pre > threshold).astype(hidden_pre.dtype)


class JumpReLUSAE(BaseSAEModule):
    cfg: JumpReLUSAEConfig

    def extra_params(self) -> None:
        dtype = self.cfg.jnp_dtype
        self.threshold = self.param("threshold", zeros, (self.cfg.d_sae,), dtype)
        self.b_enc = self.param("b_enc", zeros, (self.cfg.d_sae,), dtype)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        return jumprelu(hidden_pre, self.threshold), hidden_pre


def fold_W_dec_norm(params: dict, cfg: JumpReLUSAEConfig) -> dict:
    """Unit-norm decoder rows; encoder, b_enc and threshold scaled so outputs are unchanged."""
    return fold_decoder_norms(params, scale_keys=("b_enc", "threshold"))
