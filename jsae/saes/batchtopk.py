"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"), training side.

Keeps the k * n_tokens largest relu'd pre-activations of the whole batch, so k holds on
average rather than per token. A running threshold (the EMA of the smallest kept activation)
replaces the batch top-k at inference: the trained SAE is saved as a JumpReLU SAE with that
threshold, as SAELens saves it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import (
    Array,
    decoder_row_norms,
    fold_decoder_norms,
    training_hidden_pre,
    training_module_cfg,
)
from jsae.saes._ops import REFERENCE, Ops
from jsae.saes._training import TrainingFields, TrainOutput, finish, mse
from jsae.saes.topk import TopKSAE, TopKSAEConfig, check_topk_training, topk_aux_loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchTopKTrainingSAEConfig(SAEConfig, TrainingFields):
    """Training config of a BatchTopK SAE (SAELens' BatchTopKTrainingSAEConfig).

    Attributes:
        k: average number of active latents per token (may be fractional).
        topk_threshold_lr: EMA rate of the inference threshold.
        aux_loss_coefficient: weight of the aux-k loss.
        rescale_acts_by_decoder_norm: select as if decoder rows had unit norm.
        use_sparse_activations: SAELens' flag, kept for config compatibility.
    """

    architecture = "batchtopk"
    inference_architecture = "jumprelu"

    k: float = 100
    topk_threshold_lr: float = 0.01
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True
    use_sparse_activations: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_training()
        name = type(self).__name__
        if isinstance(self.k, bool) or not isinstance(self.k, int | float) or not 0 < self.k <= self.d_sae:
            raise ConfigError(f"{name}.k must be in (0, d_sae={self.d_sae}], got {self.k!r}.")
        if not 0 < self.topk_threshold_lr <= 1:
            raise ConfigError(f"{name}.topk_threshold_lr must be in (0, 1], got {self.topk_threshold_lr!r}.")
        check_topk_training(self)

    def topk_module(self) -> TopKSAE:
        """A TopK module sharing this SAE's input preparation and (rescaled) decoder."""
        common = {f: getattr(self, f) for f in SAEConfig.field_names()}
        cfg = TopKSAEConfig(**common, k=1, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        return TopKSAE(training_module_cfg(cfg))


def batch_topk(hidden_pre: Array, k: float) -> Array:
    """Keep the int(k * n_tokens) largest relu'd entries of the whole batch, zeros elsewhere."""
    acts = jax.nn.relu(hidden_pre)
    flat = acts.reshape(-1)
    n_keep = int(k * (flat.shape[0] // acts.shape[-1]))
    values, indices = jax.lax.top_k(flat, n_keep)
    return jnp.zeros_like(flat).at[indices].set(values).reshape(acts.shape)


def encode_decode(params: dict, x: Array, cfg: BatchTopKTrainingSAEConfig):
    """(feature_acts, hidden_pre, sae_out, module, input state) of the batch-level top-k forward."""
    module = cfg.topk_module()
    hidden_pre, state = training_hidden_pre(module, params, x)
    if cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * decoder_row_norms(params["W_dec"])
    feature_acts = batch_topk(hidden_pre, cfg.k)
    sae_out = module.apply({"params": params}, feature_acts, state, method="decode")
    return feature_acts, hidden_pre, sae_out, module, state


def training_forward(params: dict, x: Array, *, cfg: BatchTopKTrainingSAEConfig, coefficients: dict,
                     dead_mask: Array, ops: Ops = REFERENCE) -> TrainOutput:
    """MSE + aux-k (sae_lens/saes/batchtopk_sae.py)."""
    feature_acts, hidden_pre, sae_out, _, _ = encode_decode(params, x, cfg)
    aux = topk_aux_loss(x, sae_out, hidden_pre, dead_mask, params["W_dec"],
                        rescale=cfg.rescale_acts_by_decoder_norm, coefficient=cfg.aux_loss_coefficient, ops=ops)
    losses = {"mse_loss": mse(sae_out, x), "auxiliary_reconstruction_loss": aux}
    return finish(losses, feature_acts, hidden_pre, sae_out)


# --------------------------------------------------------------------------- the threshold EMA
def init_threshold() -> Array:
    """The running threshold as a float32 (hi, lo) pair: hi + lo carries ~48 bits, like SAELens' float64."""
    return jnp.zeros((2,), jnp.float32)


def threshold_value(pair: Array) -> Array:
    return pair[0] + pair[1]


def update_threshold(pair: Array, feature_acts: Array, lr: float, axis_name: str | None = None) -> Array:
    """θ <- (1 - lr) θ + lr * min(positive activations), skipped when nothing fired.

    Written as θ + lr (m - θ) with compensated (two-sum) addition so the rounding error of a
    step is relative to the increment, not to θ: float32 pairs then track float64 closely
    without enabling x64.
    """
    positive = feature_acts > 0
    smallest = jnp.min(jnp.where(positive, feature_acts, jnp.inf)).astype(jnp.float32)
    fired = jnp.any(positive)
    if axis_name is not None:
        smallest = jax.lax.pmin(smallest, axis_name)
        fired = jax.lax.pmax(fired.astype(jnp.int32), axis_name) > 0
    hi, lo = pair[0], pair[1]
    increment = jnp.float32(lr) * ((smallest - hi) - lo)
    total = hi + increment
    virtual = total - hi
    error = (hi - (total - virtual)) + (increment - virtual)
    lo = lo + error
    new_hi = total + lo
    new_lo = lo - (new_hi - total)
    return jnp.where(fired, jnp.stack([new_hi, new_lo]), pair)


def init_state(cfg: BatchTopKTrainingSAEConfig) -> dict[str, Array]:
    """BatchTopK's own training state: the running threshold."""
    return {"threshold": init_threshold()}


def update_state(state: dict, out: TrainOutput, cfg: BatchTopKTrainingSAEConfig, axis_name: str | None) -> dict:
    return {"threshold": update_threshold(state["threshold"], out.feature_acts, cfg.topk_threshold_lr, axis_name)}


def state_metrics(state: dict, cfg: BatchTopKTrainingSAEConfig) -> dict[str, Array]:
    return {"metrics/topk_threshold": threshold_value(state["threshold"])}


def to_inference_params(params: dict, state: dict, cfg: BatchTopKTrainingSAEConfig, input_scale: float) -> dict:
    """JumpReLU weights, as SAELens saves a BatchTopK SAE: decoder norms folded (when rescaling) and
    the running threshold as a constant threshold (divided by the input scale when rescaling, where
    the folded decoder rows carry that scale)."""
    pair = np.asarray(state["threshold"], np.float64)
    threshold = float(pair[0] + pair[1])
    if cfg.rescale_acts_by_decoder_norm:
        threshold /= input_scale
        params = fold_decoder_norms(params, scale_keys=("b_enc",))
    dtype = params["W_enc"].dtype
    return params | {"threshold": jnp.full((cfg.d_sae,), threshold, dtype)}


def training_architecture(name: str, config_cls: type, forward):
    """The TrainingArchitecture of a BatchTopK-style SAE (its running threshold, saved as JumpReLU)."""
    from jsae.saes import TrainingArchitecture

    return TrainingArchitecture(name, config_cls, forward, init_state=init_state, update_state=update_state,
                                state_metrics=state_metrics, dead_latent_loss=True, to_inference=to_inference_params)
