"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

gate = (x̃ W_enc + b_gate) > 0; magnitude = relu(x̃ (W_enc * exp(r_mag)) + b_mag); f = gate * magnitude.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsae.config import SAEConfig
from jsae.saes._base import (
    Array,
    BaseSAEModule,
    decoder_row_norms,
    fold_decoder_norms,
    training_module_cfg,
    zeros,
)
from jsae.saes._ops import REFERENCE, Ops
from jsae.saes._training import TrainingFields, TrainOutput, check_nonnegative, finish, mse


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


# Per-latent axes for feature sharding: the gate and magnitude vectors split with the latents.
LATENT_AXES = {"W_enc": -1, "W_dec": -2, "b_gate": -1, "b_mag": -1, "r_mag": -1}


def fold_W_dec_norm(params: dict, cfg: GatedSAEConfig) -> dict:
    """Unit-norm decoder rows; W_enc, b_gate and b_mag scaled (r_mag rides on W_enc)."""
    return fold_decoder_norms(params, scale_keys=("b_gate", "b_mag"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedTrainingSAEConfig(GatedSAEConfig, TrainingFields):
    """Training config of a gated SAE.

    Attributes:
        l1_coefficient: weight of the L1 penalty on the gate pre-activations (times decoder norms).
        l1_warm_up_steps: the coefficient ramps linearly from 0 over this many steps.
    """

    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        check_nonnegative(self, "l1_coefficient", "l1_warm_up_steps")

    def coefficients(self) -> dict[str, tuple[float, int]]:
        return {"l1": (self.l1_coefficient, self.l1_warm_up_steps)}


def training_forward(params: dict, x: Array, *, cfg: GatedTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops: Ops = REFERENCE) -> TrainOutput:
    """MSE + L1 on relu(gate pre-activation) * ‖W_dec‖ + the gate path's own reconstruction loss."""
    module = GatedSAE(training_module_cfg(cfg))
    feature_acts, hidden_pre, state = module.apply({"params": params}, x, method="encode_with_state")
    sae_out = module.apply({"params": params}, feature_acts, state, method="decode")
    centred = x - params["b_dec"] * cfg.apply_b_dec_to_input
    pi_gate = jax.nn.relu(centred @ params["W_enc"] + params["b_gate"])
    l1 = coefficients["l1"] * jnp.mean(jnp.sum(pi_gate * decoder_row_norms(params["W_dec"]), axis=-1))
    via_gate = pi_gate @ params["W_dec"] + params["b_dec"]
    losses = {"mse_loss": mse(sae_out, x), "l1_loss": l1, "auxiliary_reconstruction_loss": mse(via_gate, x)}
    return finish(losses, feature_acts, hidden_pre, sae_out)
