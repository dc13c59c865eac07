"""Training-side pieces shared by every architecture: config fields, init, the forward's result.

Each architecture file defines a `...TrainingSAEConfig` (its inference config plus the SAELens
training fields) and a `training_forward(params, x, *, cfg, coefficients, dead_mask)` that
returns a `TrainOutput`; the pure train step in `jsae.training` differentiates its `.loss`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jsae._errors import ConfigError
from jsae.config import SAEConfig
from jsae.saes._base import Array, kaiming_uniform_rows

# Per-latent axes of the parameters every autoencoder has (negative: counted from the end, so a
# sweep's leading member axis does not move them).
COMMON_LATENT_AXES = {"W_enc": -1, "W_dec": -2, "b_enc": -1}

# How a ReLU / JumpReLU training step runs its products: "auto" lets the execution plan pick the
# back end's fused dense step where it has one; "xla" keeps the reference.
DENSE_IMPLEMENTATIONS = ("auto", "xla")


class TrainOutput(NamedTuple):
    """One training forward pass.

    Attributes:
        loss: the scalar that is differentiated (sum of `losses`).
        losses: named loss terms, SAELens names (mse_loss, l1_loss, auxiliary_reconstruction_loss, ...).
        feature_acts: latent activations (batch, d_sae).
        hidden_pre: pre-activations (batch, d_sae); None where the forward did not write them out
            (a back end's fused dense step).
        sae_out: reconstruction (batch, d_out).
        top_acts: the sparse TopK path's k activations per token (batch, k), else None.
        top_indices: their latent indices (batch, k), else None.
        fired_count: tokens each latent fired on (d_sae,), when the forward counts them anyway
            (the dense step's counts); else None and `fired_counts` tests
            feature_acts.
    """

    loss: Array
    losses: dict[str, Array]
    feature_acts: Array
    hidden_pre: Array | None
    sae_out: Array
    top_acts: Array | None = None
    top_indices: Array | None = None
    fired_count: Array | None = None

    def fired_counts(self) -> Array:
        """Tokens each latent fired on (d_sae,) — from the k active latents when the forward kept them."""
        if self.fired_count is not None:
            return self.fired_count
        if self.top_indices is None:
            return jnp.sum((self.feature_acts != 0).astype(jnp.float32), axis=0)
        fired = (self.top_acts != 0).astype(jnp.float32).reshape(-1)
        return jax.ops.segment_sum(fired, self.top_indices.reshape(-1), num_segments=self.hidden_pre.shape[-1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingFields:
    """Fields every SAELens training config has.

    Attributes:
        decoder_init_norm: decoder rows start at this norm ("heuristic" init); None keeps kaiming rows.
    """

    inference_architecture: ClassVar[str] = ""

    decoder_init_norm: float | None = 0.1

    def validate_training(self) -> None:
        name = type(self).__name__
        if self.decoder_init_norm is not None and not self.decoder_init_norm > 0:
            raise ConfigError(f"{name}.decoder_init_norm must be positive or None, got {self.decoder_init_norm!r}.")

    def coefficients(self) -> dict[str, tuple[float, int]]:
        """Loss coefficient name -> (final value, warm-up steps)."""
        return {}

    @property
    def batch_width(self) -> int:
        """Width of a training batch row: d_in (a transcoder's rows hold its input and target side by side)."""
        return self.d_in

    def split_batch(self, batch: Array) -> tuple[Array, Array]:
        """(input, target) of a training batch: an autoencoder's target is its input."""
        return batch, batch

    def inference_config(self) -> SAEConfig:
        """The config the trained SAE is saved with (training fields move into metadata)."""
        from jsae.saes import get_architecture

        arch = get_architecture(self.inference_architecture or self.architecture)
        inference_fields = set(arch.config_cls.field_names())
        kwargs = {f: getattr(self, f) for f in inference_fields if f != "metadata" and hasattr(self, f)}
        details = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in inference_fields and f.name != "metadata"
        }
        metadata = self.metadata.replace(
            training_architecture=self.architecture, training_architecture_details=details
        )
        return arch.config_cls(**kwargs, metadata=metadata)


def check_nonnegative(cfg: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{type(cfg).__name__}.{field} must be a number >= 0, got {value!r}.")


def check_dense_implementation(cfg: Any) -> None:
    if cfg.dense_implementation not in DENSE_IMPLEMENTATIONS:
        raise ConfigError(f"{type(cfg).__name__}.dense_implementation must be one of {list(DENSE_IMPLEMENTATIONS)}, "
                          f"got {cfg.dense_implementation!r}.")


def init_training_params(cfg: SAEConfig, key: Array, extra: dict[str, Array] | None = None) -> dict[str, Array]:
    """SAELens' training init: kaiming-uniform W_dec rows rescaled to decoder_init_norm, W_enc = W_dec.T
    (a config with `tied_encoder_init` False: W_enc's rows drawn the same way, independently).

    Every other parameter starts at zero unless given in `extra`.
    """
    module = training_module(cfg)
    dtype = cfg.jnp_dtype
    x = jnp.ones((1, cfg.d_in), dtype)
    params = dict(jax.eval_shape(lambda: module.init(key, x, method="encode"))["params"])
    W_dec = kaiming_uniform_rows(key, (cfg.d_sae, cfg.d_out), jnp.float32)
    norm = getattr(cfg, "decoder_init_norm", None)
    if norm is not None:
        W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True) * norm
    out = {name: jnp.zeros(s.shape, s.dtype) for name, s in params.items()}
    out["W_dec"] = W_dec.astype(dtype)
    if getattr(cfg, "tied_encoder_init", True):
        out["W_enc"] = W_dec.T.astype(dtype)
    else:
        # Input and output spaces differ (transcoders): encoder rows drawn alike, over d_in, independently.
        W_enc = kaiming_uniform_rows(jax.random.fold_in(key, 1), (cfg.d_sae, cfg.d_in), jnp.float32)
        if norm is not None:
            W_enc = W_enc / jnp.linalg.norm(W_enc, axis=-1, keepdims=True) * norm
        out["W_enc"] = W_enc.T.astype(dtype)
    out = {name: value for name, value in out.items() if name in params}  # tied encoders have no W_enc
    out.update(extra or {})
    return out


def training_module(cfg: SAEConfig):
    """The Linen module whose input preparation and decoder an architecture trains with."""
    from jsae.saes import get_architecture
    from jsae.saes._base import training_module_cfg

    if hasattr(cfg, "topk_module"):
        return cfg.topk_module()
    name = getattr(cfg, "inference_architecture", "") or cfg.architecture
    return get_architecture(name).module_cls(training_module_cfg(cfg))


def mse(sae_out: Array, x: Array) -> Array:
    """SAELens' mse_loss: squared error summed over features, averaged over tokens."""
    return jnp.mean(jnp.sum(jnp.square(sae_out - x), axis=-1))


def finish(losses: dict[str, Array], feature_acts: Array, hidden_pre: Array, sae_out: Array) -> TrainOutput:
    total = sum(losses.values())
    return TrainOutput(total, losses, feature_acts, hidden_pre, sae_out)
