"""PNG plots of a training run: the feature-density histogram and the training curves.

matplotlib is imported when a plot is drawn (it ships with the `bridge` extra, or
`pip install matplotlib`), with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIGURE_SIZE = (8.0, 5.0)  # inches
DPI = 100  # so every PNG is 800 x 500 pixels

# (JSONL key, panel title, y-axis label with units); each panel plots training and, when logged, eval values.
CURVES = (
    ("losses/overall_loss", "loss", "loss (MSE + sparsity terms, activation units²)"),
    ("metrics/l0", "L0", "L0 (active latents per token)"),
    ("metrics/explained_variance", "explained variance", "explained variance (fraction, 1 = perfect)"),
    ("sparsity/dead_features", "dead features", "dead features (latents)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file written by the trainer (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_feature_density(log10_density: Any, path: str | Path, *, title: str = "Feature density"):
    """Histogram of log10 feature density (SAELens' sparsity.safetensors values); returns the figure.

    Latents that did not fire (in the window the density was measured over) sit at
    log10(1e-10) = -10, shown as the leftmost bar.
    """
    plt = _pyplot()
    values = np.asarray(log10_density, np.float64).reshape(-1)
    fig, ax = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
    ax.hist(values, bins=60, color="#3b6ea8")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents (count)")
    dead = int(np.sum(values <= -9.99))
    ax.set_title(f"{title}: {values.size} latents, {dead} did not fire, median 10^{np.median(values):.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path):
    """Loss, L0, explained variance and dead features against training tokens; returns the figure.

    Eval records (keys `eval/l0`, `eval/explained_variance`) are drawn as points on the same panels.
    """
    plt = _pyplot()
    train = [r for r in records if "losses/overall_loss" in r]
    evals = [r for r in records if "eval/l0" in r]
    fig, axes = plt.subplots(2, 2, figsize=FIGURE_SIZE, dpi=DPI, sharex=True)
    eval_keys = {"metrics/l0": "eval/l0", "metrics/explained_variance": "eval/explained_variance"}
    for ax, (key, title, ylabel) in zip(axes.flat, CURVES, strict=True):
        ax.plot([r["tokens"] / 1e6 for r in train], [r[key] for r in train], lw=1, label="training batches")
        if key in eval_keys and evals:
            ax.plot([r["tokens"] / 1e6 for r in evals], [r[eval_keys[key]] for r in evals], "o", ms=4,
                    label="held-out eval")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=7)
        if key == "losses/overall_loss" and train and min(r[key] for r in train) > 0:
            ax.set_yscale("log")
    for ax in axes[-1]:
        ax.set_xlabel("training tokens (millions)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig


def write_run_plots(folder: str | Path, sae, metrics_path: str | Path | None = None) -> list[Path]:
    """Write feature_density.png (from the SAE's sparsity) and training_curves.png (from metrics.jsonl) into `folder`.

    Returns the paths written; a plot whose data is missing is left out.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if sae.sparsity is not None:
        plot_feature_density(np.asarray(sae.sparsity), folder / "feature_density.png")
        written.append(folder / "feature_density.png")
    metrics_path = Path(metrics_path) if metrics_path is not None else folder / "metrics.jsonl"
    if metrics_path.is_file():
        records = read_metrics(metrics_path)
        if any("losses/overall_loss" in r for r in records):
            plot_training_curves(records, folder / "training_curves.png")
            written.append(folder / "training_curves.png")
    return written
