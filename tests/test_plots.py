"""The run's PNG plots: the expected size, real content, axes labelled with units."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from jsae.plots import DPI, FIGURE_SIZE, plot_feature_density, plot_training_curves, read_metrics

SIZE = (int(FIGURE_SIZE[0] * DPI), int(FIGURE_SIZE[1] * DPI))


def assert_drawn_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == SIZE
        pixels = np.asarray(image.convert("L"), np.float64)
    assert pixels.std() > 5  # not a blank canvas
    assert np.mean(pixels < 128) > 0.005  # bars / lines / text drawn in dark ink


def test_feature_density_histogram(tmp_path):
    rng = np.random.default_rng(0)
    log_density = np.concatenate([rng.normal(-2.5, 0.7, 900), np.full(100, -10.0)])
    fig = plot_feature_density(log_density, tmp_path / "density.png")
    assert_drawn_png(tmp_path / "density.png")
    (ax,) = fig.axes
    assert "log10 feature density" in ax.get_xlabel() and "fraction of tokens" in ax.get_xlabel()
    assert "count" in ax.get_ylabel()
    assert "100 did not fire" in ax.get_title()
    heights = [patch.get_height() for patch in ax.patches]
    assert sum(heights) == 1000 and heights[0] == 100  # every latent counted; the dead ones leftmost


def test_training_curves(tmp_path):
    records = [{"step": s, "tokens": 4096 * s, "losses/overall_loss": 10 / s, "metrics/l0": 32.0,
                "metrics/explained_variance": 1 - 1 / s, "sparsity/dead_features": max(0, 50 - s)}
               for s in range(1, 101)]
    records += [{"step": s, "tokens": 4096 * s, "eval/l0": 31.5, "eval/explained_variance": 0.8} for s in (50, 100)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 101, "tok')  # torn last line
    assert len(read_metrics(path)) == 102
    fig = plot_training_curves(read_metrics(path), tmp_path / "curves.png")
    assert_drawn_png(tmp_path / "curves.png")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("loss" in y and "units" in y for y in labels)
    assert any(y.startswith("L0 (active latents per token)") for y in labels)
    assert any("explained variance (fraction" in y for y in labels)
    assert any("dead features (latents)" in y for y in labels)
    assert all(ax.get_xlabel() == "training tokens (millions)" for ax in fig.axes[2:])
    l0_axis = next(ax for ax in fig.axes if ax.get_ylabel().startswith("L0"))
    assert len(l0_axis.lines) == 2 and len(l0_axis.lines[1].get_xdata()) == 2  # training curve + eval points
