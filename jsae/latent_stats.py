"""Per-latent statistics for feature dashboards, gathered in one streaming pass over token rows.

For each chosen latent: how often it fires, an exact histogram of its nonzero activations on a
fixed log10 grid, its top-k activating tokens (a running buffer merged with each batch by
`jax.lax.top_k`), a uniform random sample of the tokens where it fires (reservoir sampling by
random keys: the R largest of i.i.d. uniform keys are a uniform sample without replacement,
merged the same way), and for both the latent's activations in a window of positions around the
token. Everything stays on the device; only `finalize` copies to the host.

The batch is whole token rows (rows, context, latents), so a token's window lies in its batch.
Token indices are global: row * context + position, counting rows over the whole pass.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jsae._errors import ConfigError

__all__ = ["LatentStats", "LatentStatsConfig", "init_latent_stats", "logit_effects", "stats_to_numpy",
           "update_latent_stats"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentStatsConfig:
    """What the pass keeps per latent.

    Attributes:
        n_latents: latents tracked (columns of the activations handed to `update_latent_stats`).
        n_top: top activating tokens kept.
        n_samples: tokens kept in the random sample of firing tokens (for quantile examples).
        left / right: window positions kept before / after each token.
        hist_log10_min / hist_log10_max / hist_bins: the histogram's grid over log10(activation); values
            outside it are counted in the first / last bin.
    """

    n_latents: int
    n_top: int = 20
    n_samples: int = 200
    left: int = 12
    right: int = 4
    hist_log10_min: float = -3.0
    hist_log10_max: float = 3.0
    hist_bins: int = 60

    def __post_init__(self):
        for name in ("n_latents", "n_top", "n_samples", "hist_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LatentStatsConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("left", "right"):
            if getattr(self, name) < 0:
                raise ConfigError(f"LatentStatsConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if not self.hist_log10_min < self.hist_log10_max:
            raise ConfigError(f"LatentStatsConfig: hist_log10_min ({self.hist_log10_min}) must be below "
                              f"hist_log10_max ({self.hist_log10_max}).")

    @property
    def window(self) -> int:
        return self.left + 1 + self.right

    def bin_edges(self) -> np.ndarray:
        """The histogram's bin edges in log10(activation), hist_bins + 1 of them."""
        return np.linspace(self.hist_log10_min, self.hist_log10_max, self.hist_bins + 1)


class LatentStats(NamedTuple):
    """The running state (n = n_latents, K = n_top, R = n_samples, W = window). A top slot holds a
    firing token exactly when its value is > 0 (else -inf), a sample slot when its key is >= 0."""

    n_tokens: jax.Array  # () int32: tokens counted (those the mask keeps)
    n_fired: jax.Array  # (n,) int32: counted tokens where the latent is > 0
    sum_fired: jax.Array  # (n,) float32: sum of its activations there
    histogram: jax.Array  # (n, bins) int32: counted firing tokens per log10 bin
    top_values: jax.Array  # (n, K) float32, descending
    top_tokens: jax.Array  # (n, K) int32 global token index
    top_windows: jax.Array  # (n, K, W) float32; NaN outside the row
    sample_keys: jax.Array  # (n, R) float32
    sample_values: jax.Array  # (n, R)
    sample_tokens: jax.Array  # (n, R) int32
    sample_windows: jax.Array  # (n, R, W)


def init_latent_stats(cfg: LatentStatsConfig) -> LatentStats:
    n, k, r, w = cfg.n_latents, cfg.n_top, cfg.n_samples, cfg.window
    return LatentStats(
        n_tokens=jnp.zeros((), jnp.int32), n_fired=jnp.zeros((n,), jnp.int32), sum_fired=jnp.zeros((n,), jnp.float32),
        histogram=jnp.zeros((n, cfg.hist_bins), jnp.int32),
        top_values=jnp.full((n, k), -jnp.inf, jnp.float32), top_tokens=jnp.full((n, k), -1, jnp.int32),
        top_windows=jnp.full((n, k, w), jnp.nan, jnp.float32),
        sample_keys=jnp.full((n, r), -1.0, jnp.float32), sample_values=jnp.zeros((n, r), jnp.float32),
        sample_tokens=jnp.full((n, r), -1, jnp.int32), sample_windows=jnp.full((n, r, w), jnp.nan, jnp.float32),
    )


def _windows(acts: jax.Array, tokens: jax.Array, left: int, right: int) -> jax.Array:
    """(n, m, W) activations of latent i around each of its m batch-local tokens; NaN outside the row.

    acts: (rows, context, n); tokens: (n, m) batch-local flat indices.
    """
    _, context, n = acts.shape
    row, pos = tokens // context, tokens % context
    positions = pos[..., None] + jnp.arange(-left, right + 1)[None, None, :]
    inside = (positions >= 0) & (positions < context)
    values = acts[row[..., None], jnp.clip(positions, 0, context - 1), jnp.arange(n)[:, None, None]]
    return jnp.where(inside, values.astype(jnp.float32), jnp.nan)


def _merge(scores, values, tokens, windows, new_scores, new_values, new_tokens, new_windows, k):
    """The k best by score of a buffer and a batch's candidates, per latent."""
    scores = jnp.concatenate([scores, new_scores], axis=1)
    best, order = jax.lax.top_k(scores, k)
    pick = partial(jnp.take_along_axis, indices=order, axis=1)
    windows = jnp.take_along_axis(jnp.concatenate([windows, new_windows], axis=1), order[..., None], axis=1)
    return best, pick(jnp.concatenate([values, new_values], axis=1)), pick(jnp.concatenate([tokens, new_tokens], axis=1)), windows


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("stats",))
def update_latent_stats(stats: LatentStats, acts: jax.Array, mask: jax.Array, first_token: jax.Array,
                        key: jax.Array, *, cfg: LatentStatsConfig) -> LatentStats:
    """Fold one batch of whole token rows into `stats`.

    Args:
        stats: the running state (donated).
        acts: (rows, context, n_latents) activations of the tracked latents.
        mask: (rows, context) bools: tokens counted (e.g. not BOS); others appear only inside windows.
        first_token: () int32 global index of the batch's first token.
        key: a PRNG key for this batch's sample keys (a different one per batch).
    """
    rows, context, n = acts.shape
    flat = acts.reshape(rows * context, n).T.astype(jnp.float32)  # (n, B)
    fired = (flat > 0) & mask.reshape(1, rows * context)
    width = (cfg.hist_log10_max - cfg.hist_log10_min) / cfg.hist_bins
    bins = jnp.clip(jnp.floor((jnp.log10(jnp.where(fired, flat, 1.0)) - cfg.hist_log10_min) / width),
                    0, cfg.hist_bins - 1).astype(jnp.int32)
    histogram = stats.histogram.at[jnp.arange(n)[:, None], bins].add(fired.astype(jnp.int32))

    k = min(cfg.n_top, rows * context)
    top_scores, top_local = jax.lax.top_k(jnp.where(fired, flat, -jnp.inf), k)
    top = _merge(stats.top_values, stats.top_values, stats.top_tokens, stats.top_windows,
                 top_scores, top_scores, top_local + first_token, _windows(acts, top_local, cfg.left, cfg.right),
                 cfg.n_top)

    r = min(cfg.n_samples, rows * context)
    keys = jnp.where(fired, jax.random.uniform(key, flat.shape), -1.0)
    sample_keys, sample_local = jax.lax.top_k(keys, r)
    sample = _merge(stats.sample_keys, stats.sample_values, stats.sample_tokens, stats.sample_windows,
                    sample_keys, jnp.take_along_axis(flat, sample_local, axis=1), sample_local + first_token,
                    _windows(acts, sample_local, cfg.left, cfg.right), cfg.n_samples)
    return LatentStats(
        n_tokens=stats.n_tokens + mask.sum(dtype=jnp.int32), n_fired=stats.n_fired + fired.sum(1, dtype=jnp.int32),
        sum_fired=stats.sum_fired + jnp.where(fired, flat, 0.0).sum(1), histogram=histogram,
        top_values=top[0], top_tokens=top[2], top_windows=top[3],
        sample_keys=sample[0], sample_values=sample[1], sample_tokens=sample[2], sample_windows=sample[3],
    )


def stats_to_numpy(stats: LatentStats) -> dict[str, np.ndarray]:
    """The state on the host. Empty or unfired slots: top_values not > 0, sample_keys < 0."""
    return {name: np.asarray(value) for name, value in stats._asdict().items()}


@partial(jax.jit, static_argnames=("n",))
def logit_effects(directions: jax.Array, W_U: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """The tokens each direction promotes and suppresses most through the unembedding.

    directions: (latents, d_model), the latents' decoder rows in the residual stream; W_U: (d_model, d_vocab).
    Returns (top values, top token ids, bottom values, bottom token ids), each (latents, n), the bottom ones
    most negative first (sae-dashboard's logit tables: W_dec @ W_U, without the final layer norm).
    """
    logits = directions.astype(jnp.float32) @ W_U.astype(jnp.float32)
    top, top_ids = jax.lax.top_k(logits, n)
    bottom, bottom_ids = jax.lax.top_k(-logits, n)
    return top, top_ids, -bottom, bottom_ids
