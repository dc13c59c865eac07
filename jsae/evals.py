"""Evaluation math (pure numpy/JAX): streaming reconstruction statistics with SAELens' definitions."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class ExplainedVarianceStats:
    """Streaming float64 accumulator of MSE, explained variance, L0 and L1 over batches.

    explained_variance = 1 - E‖x - x̂‖² / (E‖x‖² - ‖E x‖²), the SAELens definition.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sum_x = None
        self.sum_sq = 0.0
        self.l0 = 0.0
        self.l1 = 0.0

    def update(self, x, x_hat, feature_acts=None) -> None:
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        x_hat = np.asarray(x_hat, np.float64).reshape(x.shape)
        self.n += x.shape[0]
        self.sq_err += float(np.sum((x - x_hat) ** 2))
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq += float(np.sum(x**2))
        if feature_acts is not None:
            f = np.asarray(feature_acts, np.float64).reshape(x.shape[0], -1)
            self.l0 += float(np.sum(f != 0))
            self.l1 += float(np.sum(np.abs(f)))

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no tokens were accumulated")
        total_variance = self.sum_sq / self.n - float(np.sum((self.sum_x / self.n) ** 2))
        mse = self.sq_err / self.n
        return {
            "mse": mse,
            "explained_variance": 1 - mse / total_variance,
            "l0": self.l0 / self.n,
            "l1": self.l1 / self.n,
        }


class SparsityVarianceMetrics:
    """SAELens' sparsity and variance evals (get_sparsity_and_variance_metrics), accumulated per batch.

    `update(x, x_hat, feature_acts, mask)` takes one batch of rows: x and x_hat (rows, ctx, d),
    feature_acts (rows, ctx, d_sae), mask (rows, ctx) of positions to count. `result()` gives the
    scalar metrics (l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias, l0, l1,
    explained_variance, explained_variance_legacy, mse, cossim) and `feature_metrics()` the
    per-latent feature_density and consistent_activation_heuristic.
    """

    def __init__(self, d_sae: int) -> None:
        self.per_token: dict[str, list[np.ndarray]] = {}
        self.per_batch_bias: list[float] = []
        self.variance = ExplainedVarianceStats()
        self.feature_acts = np.zeros(d_sae, np.float64)
        self.feature_prompts = np.zeros(d_sae, np.float64)
        self.tokens = 0

    def _add(self, name: str, values: np.ndarray) -> None:
        self.per_token.setdefault(name, []).append(np.asarray(values, np.float64))

    def update(self, x, x_hat, feature_acts, mask=None) -> None:
        """Add one batch. feature_acts may be a jax.Array on any device: the latents are reduced there
        (`latent_reductions`) and only per-token and per-latent figures come to the host."""
        x = np.asarray(x, np.float32)
        x_hat = np.asarray(x_hat, np.float32)
        mask = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
        flat = mask.reshape(-1)
        xi = x.reshape(-1, x.shape[-1])[flat].astype(np.float64)
        xo = x_hat.reshape(-1, x_hat.shape[-1])[flat].astype(np.float64)
        reduced = {k: np.asarray(v) for k, v in latent_reductions(feature_acts, mask).items()}
        norm_in = np.linalg.norm(xi, axis=-1)
        norm_out = np.linalg.norm(xo, axis=-1)
        self._add("l2_norm_in", norm_in)
        self._add("l2_norm_out", norm_out)
        self._add("l2_ratio", norm_out / np.where(np.abs(norm_in) < 1e-4, 1.0, norm_in))
        self.per_batch_bias.append(float(np.mean(norm_out**2) / np.mean(np.sum(xi * xo, axis=-1))))
        self._add("l0", reduced["l0"].reshape(-1)[flat])
        self._add("l1", reduced["l1"].reshape(-1)[flat])
        rss = np.sum((xi - xo) ** 2, axis=-1)
        self._add("explained_variance_legacy", 1 - rss / np.sum((xi - xi.mean(0)) ** 2, axis=-1))
        self._add("mse", rss)
        self._add("cossim", np.sum(xi * xo, axis=-1) / (norm_in * norm_out))
        self.variance.update(xi, xo)
        self.feature_acts += reduced["fired"]
        self.feature_prompts += reduced["prompts"]
        self.tokens += int(mask.sum())

    def result(self) -> dict[str, float]:
        out = {name: float(np.concatenate(values).mean()) for name, values in self.per_token.items()}
        out["relative_reconstruction_bias"] = float(np.mean(self.per_batch_bias))
        out["explained_variance"] = self.variance.result()["explained_variance"]
        return out

    def feature_metrics(self) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "feature_density": self.feature_acts / self.tokens,
                "consistent_activation_heuristic": self.feature_acts / self.feature_prompts,
            }


@jax.jit
def latent_reductions(feature_acts, mask) -> dict[str, jax.Array]:
    """What the sparsity evals need of a batch's latents, computed where they are.

    Args:
        feature_acts: (rows, ctx, d_sae) latent activations.
        mask: (rows, ctx) positions that count.

    Returns:
        l0, l1: (rows, ctx) per-token count of active latents and sum of |activation| (float32);
        fired: (d_sae,) masked positions where each latent is active; prompts: (d_sae,) rows where it is.
    """
    acts = jnp.asarray(feature_acts).astype(jnp.float32)
    active = acts != 0
    fired = active & jnp.asarray(mask, bool)[..., None]
    return {"l0": active.sum(-1), "l1": jnp.abs(acts).sum(-1), "fired": fired.sum((0, 1)),
            "prompts": fired.any(1).sum(0)}


def featurewise_weight_metrics(params: dict) -> dict[str, np.ndarray]:
    """Per latent: encoder norm, encoder/decoder cosine similarity and encoder bias (SAELens' names)."""
    W_dec = np.asarray(params["W_dec"], np.float64)
    W_enc = np.asarray(params["W_enc"], np.float64) if "W_enc" in params else W_dec.T  # tied: W_decᵀ
    enc_norm = np.linalg.norm(W_enc, axis=0)
    dec_norm = np.linalg.norm(W_dec, axis=1)
    out = {
        "encoder_norm": enc_norm,
        "encoder_decoder_cosine_sim": np.sum(W_enc.T * W_dec, axis=1) / (enc_norm * dec_norm),
    }
    if "b_enc" in params:
        out["encoder_bias"] = np.asarray(params["b_enc"], np.float64)
    return out


# ---------------------------------------------------------------------- run_evals' selection and layout
METRIC_GROUPS = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Which metrics to compute and on how much data (SAELens' EvalConfig fields).

    Attributes:
        batch_size_prompts: token rows per model forward (None: the data source's own batch size).
        n_eval_reconstruction_batches: batches for the CE / KL metrics.
        compute_kl, compute_ce_loss: the spliced-model metrics (model_behavior / performance_preservation).
        n_eval_sparsity_variance_batches: batches for the sparsity, variance and shrinkage metrics.
        compute_l2_norms, compute_sparsity_metrics, compute_variance_metrics: those metric groups.
        compute_featurewise_density_statistics: per-latent feature_density and consistent_activation_heuristic.
        compute_featurewise_weight_based_metrics: per-latent encoder_norm, encoder_decoder_cosine_sim, encoder_bias.
    """

    batch_size_prompts: int | None = None
    n_eval_reconstruction_batches: int = 10
    compute_kl: bool = False
    compute_ce_loss: bool = False
    n_eval_sparsity_variance_batches: int = 1
    compute_l2_norms: bool = False
    compute_sparsity_metrics: bool = False
    compute_variance_metrics: bool = False
    compute_featurewise_density_statistics: bool = False
    compute_featurewise_weight_based_metrics: bool = False

    def __post_init__(self) -> None:
        from jsae._errors import ConfigError

        if (self.compute_kl or self.compute_ce_loss) and self.n_eval_reconstruction_batches <= 0:
            raise ConfigError("EvalConfig.n_eval_reconstruction_batches must be > 0 when compute_kl or "
                              f"compute_ce_loss is true, got {self.n_eval_reconstruction_batches}.")
        if self.sparsity_variance and self.n_eval_sparsity_variance_batches <= 0:
            raise ConfigError("EvalConfig.n_eval_sparsity_variance_batches must be > 0 when a sparsity, variance, "
                              f"l2 or density metric is on, got {self.n_eval_sparsity_variance_batches}.")

    @property
    def sparsity_variance(self) -> bool:
        return (self.compute_l2_norms or self.compute_sparsity_metrics or self.compute_variance_metrics
                or self.compute_featurewise_density_statistics)

    @classmethod
    def everything(cls, batch_size_prompts: int | None = None, n_eval_reconstruction_batches: int = 10,
                   n_eval_sparsity_variance_batches: int = 1) -> EvalConfig:
        """Every metric on (SAELens' get_eval_everything_config)."""
        return cls(batch_size_prompts=batch_size_prompts, n_eval_reconstruction_batches=n_eval_reconstruction_batches,
                   n_eval_sparsity_variance_batches=n_eval_sparsity_variance_batches, compute_kl=True,
                   compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                   compute_variance_metrics=True, compute_featurewise_density_statistics=True,
                   compute_featurewise_weight_based_metrics=True)


def group_metrics(cfg: EvalConfig, reconstruction: dict[str, float], sparsity_variance: dict[str, float]
                  ) -> dict[str, dict[str, float]]:
    """Arrange flat metrics into run_evals' groups, keeping only the groups `cfg` asks for."""
    wanted = {
        "model_behavior_preservation": cfg.compute_kl,
        "model_performance_preservation": cfg.compute_ce_loss,
        "reconstruction_quality": cfg.compute_variance_metrics,
        "shrinkage": cfg.compute_l2_norms,
        "sparsity": cfg.compute_sparsity_metrics,
    }
    values = reconstruction | sparsity_variance
    return {group: {name: values[name] for name in METRIC_GROUPS[group]}
            for group, on in wanted.items() if on}


def flatten_metrics(grouped: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{group: {name: value}} -> {name: value} (names are unique across groups)."""
    return {name: value for group in grouped.values() for name, value in group.items()}
