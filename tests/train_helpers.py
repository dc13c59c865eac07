"""Shared helpers of the training tests: reproducible activation batches and a relative distance."""

from __future__ import annotations

import numpy as np


def activation_batches(steps: int, batch: int, d_in: int, seed: int = 0) -> list[np.ndarray]:
    """`steps` float32 batches (batch, d_in): per-dimension scales and a common offset, like real activations."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, d_in)) * rng.uniform(0.5, 2, d_in) + 0.3).astype(np.float32)
            for _ in range(steps)]


def relative(a, b) -> float:
    """‖a - b‖ / ‖b‖ in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
