"""Matching Pursuit SAE (SAELens' sae_lens/saes/matching_pursuit_sae.py; Mallat & Zhang 1993).

A tied SAE: the encoder is W_decᵀ and there is no W_enc or b_enc. Encoding is greedy: from the
prepared input (minus b_dec when apply_b_dec_to_input), repeatedly pick the latent whose decoder
row has the largest relu'd inner product with the residual, add that inner product (relu'd) to
the latent and subtract its row times it from the residual; a token stops once its support did
not change (stop_on_duplicate_support) or its residual norm fell below residual_threshold, and
every token stops after max_iterations (d_in when None). Decoding is acts W_dec, plus b_dec only
when it was subtracted from the input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import Array, BaseSAEModule, kaiming_uniform_rows, l2_norm, training_module_cfg, zeros
from jsae.saes._training import TrainingFields, TrainOutput, finish, mse


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchingPursuitSAEConfig(SAEConfig):
    """Config of a Matching Pursuit SAE.

    Attributes:
        residual_threshold: a token stops once its residual norm is below this (<= 0: never).
        max_iterations: most latents picked per token; None means d_in.
        stop_on_duplicate_support: a token stops once an iteration leaves its support unchanged.
    """

    architecture = "matching_pursuit"

    residual_threshold: float = 1e-2
    max_iterations: int | None = None
    stop_on_duplicate_support: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.max_iterations
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError(f"{type(self).__name__}.max_iterations must be None or an integer >= 0, got {n!r}.")

    @property
    def iterations(self) -> int:
        return self.d_in if self.max_iterations is None else self.max_iterations


def _mp_iteration(carry, W_dec: Array, *, residual_threshold: float, stop_on_duplicate_support: bool):
    """One matching-pursuit step on flat (tokens, d_in) residuals; tokens already done add nothing."""
    residual, acts, prev_support, done = carry
    scores = jax.nn.relu(jax.lax.stop_gradient(residual) @ jax.lax.stop_gradient(W_dec).T)
    indices = jnp.argmax(scores, axis=-1)  # the first maximum, as torch's max(dim) returns
    selected = W_dec[indices]
    values = jax.nn.relu(jnp.sum(residual * selected, axis=-1, keepdims=True))
    values = (values * (~done)[:, None].astype(values.dtype)).astype(acts.dtype)
    acts = acts.at[jnp.arange(acts.shape[0]), indices].add(values[:, 0])
    residual = residual - values * selected
    support = jax.lax.stop_gradient(acts) != 0
    if stop_on_duplicate_support:
        done = done | jnp.all(support == prev_support, axis=-1)
        prev_support = support
    if residual_threshold > 0:
        done = done | (l2_norm(jax.lax.stop_gradient(residual), axis=-1) < residual_threshold)
    return residual, acts, prev_support, done


def encode_matching_pursuit(sae_in: Array, W_dec: Array, cfg: MatchingPursuitSAEConfig, *,
                            differentiable: bool = False) -> Array:
    """Latent activations (..., d_sae) of the prepared input (..., d_in).

    `differentiable`: run all `cfg.iterations` steps in a scan (reverse-mode differentiable;
    steps after every token is done change nothing) instead of a while loop that exits early.
    """
    lead = sae_in.shape[:-1]
    residual = sae_in.reshape(-1, sae_in.shape[-1])
    n = residual.shape[0]
    d_sae = W_dec.shape[0]
    carry = (residual, jnp.zeros((n, d_sae), residual.dtype), jnp.zeros((n, d_sae), bool), jnp.zeros((n,), bool))
    step_kwargs = dict(residual_threshold=cfg.residual_threshold, stop_on_duplicate_support=cfg.stop_on_duplicate_support)
    if differentiable:
        def body(c, _):
            return _mp_iteration(c, W_dec, **step_kwargs), None

        carry, _ = jax.lax.scan(body, carry, None, length=cfg.iterations)
    else:
        def cond(state):
            i, c = state
            return (i < cfg.iterations) & ~jnp.all(c[3])

        def loop(state):
            i, c = state
            return i + 1, _mp_iteration(c, W_dec, **step_kwargs)

        _, carry = jax.lax.while_loop(cond, loop, (jnp.asarray(0), carry))
    acts = carry[1]
    return acts.reshape(*lead, d_sae)


class MatchingPursuitSAE(BaseSAEModule):
    cfg: MatchingPursuitSAEConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.W_dec = self.param("W_dec", kaiming_uniform_rows, (cfg.d_sae, cfg.d_in), cfg.jnp_dtype)
        self.b_dec = self.param("b_dec", zeros, (cfg.d_in,), cfg.jnp_dtype)

    def encode_prepared(self, sae_in: Array) -> tuple[Array, Array]:
        acts = encode_matching_pursuit(sae_in, self.W_dec, self.cfg)
        return acts, jnp.zeros_like(acts)  # no single pre-activation; SAELens returns zeros too

    def decode_linear(self, feature_acts: Array) -> Array:
        out = feature_acts @ self.W_dec
        return out + self.b_dec if self.cfg.apply_b_dec_to_input else out


def fold_W_dec_norm(params: dict, cfg: MatchingPursuitSAEConfig) -> dict:
    raise ConfigError("fold_W_dec_norm is not supported for matching_pursuit SAEs: rescaling the tied decoder "
                      "rows changes which latents matching pursuit picks.")


def fold_activation_norm_scaling_factor(params: dict, cfg: MatchingPursuitSAEConfig,
                                        scaling_factor: float) -> tuple[dict, MatchingPursuitSAEConfig]:
    """Inputs scaled by s in training: b_dec/s and residual_threshold/s (the residual is in input
    units); the tied decoder keeps its directions, so the same latents are picked at 1/s the value.
    W_dec is (W_dec * s) / s, rounded as SAELens' fold leaves it (it scales W_dec through its W_enc
    view, then divides)."""
    from jsae.saes import scale_tensor

    W_dec = scale_tensor(scale_tensor(params["W_dec"], scaling_factor, divide=False), scaling_factor, divide=True)
    out = dict(params, W_dec=W_dec, b_dec=scale_tensor(params["b_dec"], scaling_factor, divide=True))
    return out, cfg.replace(normalize_activations="none", residual_threshold=cfg.residual_threshold / scaling_factor)


# --------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchingPursuitTrainingSAEConfig(MatchingPursuitSAEConfig, TrainingFields):
    """Training config of a Matching Pursuit SAE (SAELens' MatchingPursuitTrainingSAEConfig).

    Attributes:
        decoder_init_norm: must be 1.0 (SAELens sets it to 1.0 with a warning; jsae refuses other values).
    """

    decoder_init_norm: float | None = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        if self.decoder_init_norm != 1.0:
            raise ConfigError(
                f"{type(self).__name__}.decoder_init_norm must be 1.0 for matching pursuit (its encoder is the "
                f"decoder), got {self.decoder_init_norm!r}."
            )


LATENT_AXES = {"W_dec": -2}


def training_forward(params: dict, x: Array, *, cfg: MatchingPursuitTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops=None) -> TrainOutput:
    """SAELens' loss for matching pursuit: the MSE alone, differentiated through every pick."""
    module = MatchingPursuitSAE(training_module_cfg(cfg))
    sae_in, state = module.apply({"params": params}, x, method="prepare_input")
    acts = encode_matching_pursuit(sae_in, params["W_dec"], cfg, differentiable=True)
    sae_out = module.apply({"params": params}, acts, state, method="decode")
    return finish({"mse_loss": mse(sae_out, x)}, acts, jnp.zeros_like(acts), sae_out)
