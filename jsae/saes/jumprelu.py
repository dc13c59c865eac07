"""JumpReLU SAE: f = relu(h) * (h > threshold), h = (x - b_dec) W_enc + b_enc."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import (
    Array,
    BaseSAEModule,
    decoder_row_norms,
    fold_decoder_norms,
    training_input,
    training_module_cfg,
    zeros,
)
from jsae.saes._ops import REFERENCE, Ops
from jsae.saes._training import (
    COMMON_LATENT_AXES,
    TrainingFields,
    TrainOutput,
    check_dense_implementation,
    check_nonnegative,
    finish,
    mse,
)


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


LATENT_AXES = {**COMMON_LATENT_AXES, "threshold": -1}


def fold_W_dec_norm(params: dict, cfg: JumpReLUSAEConfig) -> dict:
    """Unit-norm decoder rows; encoder, b_enc and threshold scaled so outputs are unchanged."""
    return fold_decoder_norms(params, scale_keys=("b_enc", "threshold"))


# --------------------------------------------------------------------------- training
SPARSITY_LOSS_MODES = ("step", "tanh", "quadratic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JumpReLUTrainingSAEConfig(JumpReLUSAEConfig, TrainingFields):
    """Training config of a JumpReLU SAE (SAELens' JumpReLUTrainingSAEConfig).

    Attributes:
        jumprelu_init_threshold: initial threshold of every latent.
        jumprelu_bandwidth: width of the rectangle kernel of the straight-through estimator.
        jumprelu_sparsity_loss_mode: "step" (DeepMind's L0), "tanh" (Anthropic) or "quadratic"
            (Gemma Scope 2, around `target_l0`).
        l0_coefficient: weight of the sparsity loss; l0_warm_up_steps ramps it from 0.
        pre_act_loss_coefficient: Anthropic's pre-activation loss on dead latents (None = off).
        jumprelu_tanh_scale: scale inside tanh for the "tanh" mode.
        jumprelu_ste_to_input: also pass the estimator's gradient to the pre-activations.
        target_l0: the L0 the "quadratic" mode pulls towards.
        dense_implementation: "auto": the execution plan may run the step on a back end's fused dense
            step (for the "step" and "quadratic" modes without the pre-activation loss;
            jsae.backends); "xla": always the reference. Same results up to float rounding.
    """

    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    pre_act_loss_coefficient: float | None = None
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    target_l0: float | None = None
    dense_implementation: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        check_dense_implementation(self)
        name = type(self).__name__
        check_nonnegative(self, "jumprelu_init_threshold", "l0_coefficient", "l0_warm_up_steps")
        if not self.jumprelu_bandwidth > 0:
            raise ConfigError(f"{name}.jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth!r}.")
        if self.jumprelu_sparsity_loss_mode not in SPARSITY_LOSS_MODES:
            raise ConfigError(
                f"{name}.jumprelu_sparsity_loss_mode must be one of {list(SPARSITY_LOSS_MODES)}, "
                f"got {self.jumprelu_sparsity_loss_mode!r}."
            )
        if self.jumprelu_sparsity_loss_mode == "quadratic":
            if self.target_l0 is None or not 0 < self.target_l0 <= self.d_sae:
                raise ConfigError(
                    f"{name}.target_l0 must be in (0, d_sae={self.d_sae}] for the quadratic sparsity loss, "
                    f"got {self.target_l0!r}."
                )

    def coefficients(self) -> dict[str, tuple[float, int]]:
        return {"l0": (self.l0_coefficient, self.l0_warm_up_steps)}

    def dense_step_fusable(self) -> bool:
        """Whether the loss reads only the dense step's lin and per-token L0 ("step" and "quadratic"
        modes, no pre-activation loss), so a back end's fused dense step may run it."""
        return self.jumprelu_sparsity_loss_mode != "tanh" and self.pre_act_loss_coefficient is None


def _rectangle(u: Array) -> Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(grad: Array, shape: tuple[int, ...]) -> Array:
    return jnp.sum(grad, axis=tuple(range(grad.ndim - len(shape))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu_ste(x: Array, threshold: Array, bandwidth: float, ste_to_input: bool) -> Array:
    """x * (x > threshold), with a rectangle-kernel straight-through gradient for the threshold."""
    return x * (x > threshold).astype(x.dtype)


def _jumprelu_fwd(x, threshold, bandwidth, ste_to_input):
    return jumprelu_ste(x, threshold, bandwidth, ste_to_input), (x, threshold)


def _jumprelu_bwd(bandwidth, ste_to_input, res, g):
    x, threshold = res
    ste = (threshold / bandwidth) * _rectangle((x - threshold) / bandwidth) * g
    x_grad = (x > threshold).astype(g.dtype) * g
    if ste_to_input:
        x_grad = x_grad + ste
    return x_grad, _sum_to(-ste, threshold.shape)


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu_and_step(x: Array, threshold: Array, bandwidth: float, ste_to_input: bool) -> tuple[Array, Array]:
    """The activations x * (x > θ) and the step (x > θ), with one backward for both.

    Both straight-through estimators (Rajamanoharan et al. 2024) use the same rectangle kernel, so
    the threshold's gradient is one pass and one reduction,
    Σ_t -rect((x - θ) / bw) · (θ g_acts + g_step) / bw, rather than one of each per estimator.
    """
    step = (x > threshold).astype(x.dtype)
    return x * step, step


def _jumprelu_and_step_fwd(x, threshold, bandwidth, ste_to_input):
    return jumprelu_and_step(x, threshold, bandwidth, ste_to_input), (x, threshold)


def _jumprelu_and_step_bwd(bandwidth, ste_to_input, res, grads):
    x, threshold = res
    g_acts, g_step = grads
    ste = _rectangle((x - threshold) / bandwidth) * ((threshold * g_acts + g_step) / bandwidth)
    x_grad = (x > threshold).astype(g_acts.dtype) * g_acts
    if ste_to_input:
        x_grad = x_grad + ste
    return x_grad, _sum_to(-ste, threshold.shape)


jumprelu_and_step.defvjp(_jumprelu_and_step_fwd, _jumprelu_and_step_bwd)


def init_training_extra(cfg: JumpReLUTrainingSAEConfig) -> dict[str, Array]:
    """The threshold starts at jumprelu_init_threshold and is kept in float32 whatever the dtype."""
    return {"threshold": jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32)}


def project_params(params: dict, cfg: JumpReLUTrainingSAEConfig) -> dict:
    """Keep thresholds >= 0 (applied before each step's forward, as SAELens does)."""
    return params | {"threshold": jnp.maximum(params["threshold"], 0.0)}


def training_forward(params: dict, x: Array, *, cfg: JumpReLUTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops: Ops = REFERENCE) -> TrainOutput:
    """MSE + the sparsity loss of `jumprelu_sparsity_loss_mode` (+ the pre-activation loss on dead
    latents), as sae_lens/saes/jumprelu_sae.py computes them."""
    module = JumpReLUSAE(training_module_cfg(cfg))
    sae_in, state, shift = training_input(module, params, x)
    out = ops.dense_forward(sae_in, shift, params["W_enc"], params["b_enc"], params["W_dec"], params["threshold"],
                            bandwidth=cfg.jumprelu_bandwidth, ste_to_input=cfg.jumprelu_ste_to_input)
    sae_out = module.apply({"params": params}, out.lin + params["b_dec"], state, method="finish_output")
    losses = {"mse_loss": mse(sae_out, x)} | sparsity_losses(out, params, cfg, coefficients["l0"], dead_mask)
    return finish(losses, out.h, out.pre, sae_out)._replace(fired_count=out.fired)


def sparsity_losses(out, params: dict, cfg: JumpReLUTrainingSAEConfig, coefficient: Array,
                    dead_mask: Array) -> dict[str, Array]:
    """l0_loss of `jumprelu_sparsity_loss_mode` (and pre_act_loss when configured) of a dense forward `out`."""
    mode = cfg.jumprelu_sparsity_loss_mode
    if mode == "tanh":
        W_dec_norm = decoder_row_norms(params["W_dec"])
        per_item = jnp.sum(jnp.tanh(cfg.jumprelu_tanh_scale * out.h * W_dec_norm), axis=-1)
    elif mode == "step":
        per_item = out.l0
    else:
        per_item = 2 / cfg.target_l0 * (out.l0 - cfg.target_l0) ** 2
    losses = {"l0_loss": jnp.mean(coefficient * per_item)}
    if cfg.pre_act_loss_coefficient is not None:
        # Anthropic's pre-activation loss, on dead latents only (zero when none is dead).
        threshold = params["threshold"].astype(out.pre.dtype)
        W_dec_norm = decoder_row_norms(params["W_dec"])
        gap = jax.nn.relu(threshold - out.pre) * dead_mask.astype(out.pre.dtype) * W_dec_norm
        losses["pre_act_loss"] = cfg.pre_act_loss_coefficient * jnp.mean(jnp.sum(gap, axis=-1))
    return losses
