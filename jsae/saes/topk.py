"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

h = x̃ W_enc + b_enc (times ‖W_dec rows‖ when rescale_acts_by_decoder_norm); f keeps the
k largest entries of h, relu'd; decode divides f by the norms first when rescaling.
"""

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
    topk_scatter,
    training_hidden_pre,
    training_module_cfg,
    zeros,
)
from jsae.saes._ops import REFERENCE, Ops, pre_activations
from jsae.saes._sparse_topk import aux_k_loss, encoder_product, sparse_topk_forward
from jsae.saes._training import TrainingFields, TrainOutput, check_nonnegative, finish, mse


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKFields:
    """The fields every TopK config (SAE or transcoder) adds; listed before a config's base so they
    come after the base's fields in `to_dict` (as SAELens orders them).

    Attributes:
        k: latents kept per token.
        rescale_acts_by_decoder_norm: select and scale latents as if the decoder had unit rows.
    """

    k_error_name = None  # the class errors about k name (None: the config's own class)

    k: int = 100
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self, self.k_error_name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKSAEConfig(TopKFields, SAEConfig):
    """Config of a TopK SAE (fields in `TopKFields`)."""

    architecture = "topk"
    k_error_name = "TopKSAEConfig"


def check_k(cfg, name: str | None = None) -> None:
    """k of a TopK config (SAE or transcoder): an integer in [1, d_sae]; errors name `name` (default: cfg's class)."""
    if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 0 < cfg.k <= cfg.d_sae:
        raise ConfigError(f"{name or type(cfg).__name__}.k must be an integer in [1, d_sae={cfg.d_sae}], got {cfg.k!r}.")


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


# --------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKTrainingSAEConfig(TopKSAEConfig, TrainingFields):
    """Training config of a TopK SAE (SAELens' TopKTrainingSAEConfig).

    Attributes:
        aux_loss_coefficient: weight of the aux-k loss that revives dead latents.
        rescale_acts_by_decoder_norm: choose the top k as if decoder rows had unit norm (training default on).
        use_sparse_activations: SAELens' flag, kept for config compatibility.
        topk_implementation: how the training step computes the TopK forward and backward (same
            numbers either way): "dense" multiplies full (tokens, d_sae) activation matrices, "sparse"
            (`jsae.saes._sparse_topk`) only the encoder product and otherwise works on each token's k
            active latents; "auto" lets the execution plan choose from d_sae / k and the platform
            (`jsae.backends.resolve_plan`; the crossovers measured are in bench/RESULTS.md).
    """

    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True
    use_sparse_activations: bool = False
    topk_implementation: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        check_topk_training(self)
        if self.topk_implementation not in TOPK_IMPLEMENTATIONS:
            raise ConfigError(
                f"TopKTrainingSAEConfig.topk_implementation must be one of {list(TOPK_IMPLEMENTATIONS)}, "
                f"got {self.topk_implementation!r}."
            )


TOPK_IMPLEMENTATIONS = ("auto", "dense", "sparse")


def check_topk_training(cfg) -> None:
    check_nonnegative(cfg, "aux_loss_coefficient")
    if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise ConfigError(
            f"{type(cfg).__name__}.normalize_activations={cfg.normalize_activations!r} cannot be trained with "
            "the aux-k loss (it would reconstruct in normalised space); use 'none' or 'expected_average_only_in'."
        )


def act_times_W_dec(feature_acts: Array, W_dec: Array, rescale: bool, dot=jnp.matmul) -> Array:
    """feature_acts @ W_dec, dividing by the decoder row norms first when rescaling (no b_dec); `dot`
    runs the product (`Ops.dot`)."""
    if rescale:
        feature_acts = feature_acts * (1 / decoder_row_norms(W_dec))
    return dot(feature_acts, W_dec)


def topk_aux_loss(x: Array, sae_out: Array, hidden_pre: Array, dead_mask: Array, W_dec: Array, *,
                  rescale: bool, coefficient: float, ops: Ops = REFERENCE) -> Array:
    """Aux-k loss (Gao et al. 2024, App. B.1): the top d_in/2 dead latents reconstruct the residual.

    scale = min(n_dead / k_aux, 1); reconstruction without b_dec; zero when nothing is dead.
    """
    k_aux = x.shape[-1] // 2
    k_static = min(k_aux, hidden_pre.shape[-1])
    num_dead = jnp.sum(dead_mask)

    def compute(_):
        residual = jax.lax.stop_gradient(x - sae_out)
        masked = jnp.where(dead_mask, hidden_pre, -jnp.inf)
        values, indices = ops.top_k(masked, k_static)
        values = jnp.where(jnp.arange(k_static) < num_dead, values, 0.0)  # only the dead ones
        acts = jnp.put_along_axis(jnp.zeros_like(hidden_pre), indices, values, axis=-1, inplace=False)
        recons = act_times_W_dec(acts, W_dec, rescale, ops.dot)
        scale = jnp.minimum(num_dead / k_aux, 1.0)
        return (coefficient * scale * mse(recons, residual)).astype(jnp.float32)

    def nothing_dead(_):
        # Zero, but derived from x so it carries x's device-varying type under shard_map.
        return (x[0, 0] * 0).astype(jnp.float32)

    return jax.lax.cond(num_dead > 0, compute, nothing_dead, None)


def topk_acts(hidden_pre: Array, k_max: int, k: Array | None, ops: Ops = REFERENCE) -> Array:
    """The top k_max of hidden_pre, relu'd, zeros elsewhere; with a (traced) `k` <= k_max, only ranks below k."""
    if k is None:
        return topk_scatter(hidden_pre, k_max, ops.top_k)
    values, indices = ops.top_k(hidden_pre, k_max)
    values = jnp.where(jnp.arange(k_max) < k, jax.nn.relu(values), 0)
    return jnp.put_along_axis(jnp.zeros_like(hidden_pre), indices, values, axis=-1, inplace=False)


def training_forward(params: dict, x: Array, *, cfg: TopKTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops: Ops = REFERENCE, k: Array | None = None) -> TrainOutput:
    """The TopK training forward (sae_lens/saes/topk_sae.py); `k` (traced, <= cfg.k) keeps only the
    top k of cfg.k latents (sweeps over k). `ops.sparse_topk` takes the sparse path."""
    if ops.sparse_topk:
        return sparse_training_forward(params, x, cfg=cfg, dead_mask=dead_mask, k=k, ops=ops)
    module = TopKSAE(training_module_cfg(cfg))
    hidden_pre, state = training_hidden_pre(module, params, x, ops.dot)
    if cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * decoder_row_norms(params["W_dec"])
    feature_acts = topk_acts(hidden_pre, cfg.k, k, ops)
    # The module's decode, its product on the plan's primitives.
    lin = act_times_W_dec(feature_acts, params["W_dec"], cfg.rescale_acts_by_decoder_norm, ops.dot)
    sae_out = module.apply({"params": params}, lin + params["b_dec"], state, method="finish_output")
    aux = topk_aux_loss(x, sae_out, hidden_pre, dead_mask, params["W_dec"],
                        rescale=cfg.rescale_acts_by_decoder_norm, coefficient=cfg.aux_loss_coefficient, ops=ops)
    losses = {"mse_loss": mse(sae_out, x), "auxiliary_reconstruction_loss": aux}
    return finish(losses, feature_acts, hidden_pre, sae_out)


def sparse_training_forward(params: dict, x: Array, *, cfg: TopKTrainingSAEConfig, dead_mask: Array,
                            k: Array | None = None, ops: Ops = REFERENCE) -> TrainOutput:
    """`training_forward` on the sparse path: same losses and gradients, `top_acts` / `top_indices` set.

    Input preparation is the dense module's for the normalisations TopK trains with (a cast and
    b_dec; 'none' and 'expected_average_only_in' leave x as it is inside the SAE).
    """
    p = params
    rescale, apply_b_dec = cfg.rescale_acts_by_decoder_norm, cfg.apply_b_dec_to_input
    x_in = jnp.asarray(x).astype(cfg.jnp_dtype)
    out = sparse_topk_forward(x_in, p["b_dec"], p["W_enc"], p["b_enc"], p["W_dec"], k=cfg.k, rescale=rescale,
                              apply_b_dec=apply_b_dec, k_active=k, ops=ops)

    residual = jax.lax.stop_gradient(x - out.sae_out)
    aux = aux_k_loss(out.product, x_in, residual, dead_mask, p["b_dec"], p["W_enc"], p["b_enc"], p["W_dec"],
                     rescale=rescale, apply_b_dec=apply_b_dec, coefficient=cfg.aux_loss_coefficient, ops=ops)
    losses = {"mse_loss": mse(out.sae_out, x), "auxiliary_reconstruction_loss": aux}
    # Dense pre-activations and activations for callers that want them; dead code in a jitted
    # step, which reads top_acts / top_indices.
    # (formed here, where the screened top-k never formed it, only if something reads it)
    product = jax.lax.stop_gradient(encoder_product(out.product, x_in, p["b_dec"], p["W_enc"], apply_b_dec, ops=ops))
    pre = pre_activations(product, p["b_enc"], decoder_row_norms(p["W_dec"]) if rescale else None)
    feature_acts = jnp.put_along_axis(jnp.zeros_like(pre), out.top_indices, out.top_acts, axis=-1, inplace=False)
    return finish(losses, jax.lax.stop_gradient(feature_acts), jax.lax.stop_gradient(pre), out.sae_out)._replace(
        top_acts=out.top_acts, top_indices=out.top_indices)


def to_inference_params(params: dict, state: dict, cfg: TopKTrainingSAEConfig, input_scale: float) -> dict:
    """Fold decoder norms into the encoder when trained with rescaling (as SAELens saves it)."""
    return fold_decoder_norms(params, scale_keys=("b_enc",)) if cfg.rescale_acts_by_decoder_norm else params
