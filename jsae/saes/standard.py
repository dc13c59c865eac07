"""Standard (ReLU) SAE: f = relu((x - b_dec) W_enc + b_enc)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import (
    Array,
    BaseSAEModule,
    decoder_row_norms,
    fold_decoder_norms,
    lp_norm,
    training_input,
    training_module_cfg,
    zeros,
)
from jsae.saes._ops import REFERENCE, Ops
from jsae.saes._training import (
    TrainingFields,
    TrainOutput,
    check_dense_implementation,
    check_nonnegative,
    finish,
    mse,
)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class StandardTrainingSAEConfig(StandardSAEConfig, TrainingFields):
    """Training config of a standard SAE (SAELens' StandardTrainingSAEConfig).

    Attributes:
        l1_coefficient: weight of the decoder-norm-weighted Lp sparsity penalty.
        lp_norm: p of that penalty (1 = L1).
        l1_warm_up_steps: the coefficient ramps linearly from 0 over this many steps.
        dense_implementation: "auto": the execution plan may run the step on a back end's fused dense
            step (with lp_norm 1; jsae.backends); "xla": always the reference. Same results up to
            float rounding.
    """

    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0
    dense_implementation: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        check_nonnegative(self, "l1_coefficient", "l1_warm_up_steps")
        check_dense_implementation(self)
        if not self.lp_norm >= 1:
            raise ConfigError(f"StandardTrainingSAEConfig.lp_norm must be >= 1, got {self.lp_norm!r}.")

    def coefficients(self) -> dict[str, tuple[float, int]]:
        return {"l1": (self.l1_coefficient, self.l1_warm_up_steps)}

    def dense_step_fusable(self) -> bool:
        """Whether the loss reads only the dense step's lin, sums and counts (L1, not another Lp), so a
        back end's fused dense step may run it (`jsae.saes._ops.dense_forward`)."""
        return self.lp_norm == 1


def training_forward(params: dict, x: Array, *, cfg: StandardTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops: Ops = REFERENCE) -> TrainOutput:
    """MSE + l1_coefficient * mean_tokens ‖f ⊙ ‖W_dec rows‖‖_p (SAELens 6 standard loss,
    sae_lens/saes/standard_sae.py)."""
    module = StandardSAE(training_module_cfg(cfg))
    sae_in, state, shift = training_input(module, params, x)
    out = ops.dense_forward(sae_in, shift, params["W_enc"], params["b_enc"], params["W_dec"])
    sae_out = module.apply({"params": params}, out.lin + params["b_dec"], state, method="finish_output")
    losses = {"mse_loss": mse(sae_out, x), "l1_loss": l1_loss(out, params["W_dec"], cfg, coefficients["l1"])}
    return finish(losses, out.h, out.pre, sae_out)._replace(fired_count=out.fired)


def l1_loss(out, W_dec: Array, cfg: StandardTrainingSAEConfig, coefficient: Array) -> Array:
    """coefficient * mean_tokens ‖f ⊙ ‖W_dec rows‖‖_p of a dense forward `out` (`jsae.saes._ops.DenseForward`)."""
    norms = decoder_row_norms(W_dec)
    if cfg.lp_norm == 1:
        # f >= 0 and the norms >= 0, so ‖f ⊙ norms‖_1 = f · norms, whose mean over tokens is
        # (Σ_tokens f) · norms / tokens: one column sum instead of the (tokens, d_sae) product.
        return coefficient * (out.sums @ norms) / out.h.shape[0]
    return jnp.mean(coefficient * lp_norm(out.h * norms, cfg.lp_norm))
