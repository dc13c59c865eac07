"""Evaluation math (pure numpy/JAX): streaming reconstruction statistics with SAELens' definitions."""

from __future__ import annotations

import numpy as np


class explained_variance_stats:  # noqa: N801 - used like a function that returns an accumulator
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
