"""The sparsity and variance evals reduce the latents on their device: nothing of shape (rows, ctx, d_sae) comes
to the host, and the metrics equal the host computation of the same definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae.evals import SparsityVarianceMetrics

ROWS, CTX, D_IN, D_SAE = 3, 5, 4, 64


@pytest.fixture
def host_copies(monkeypatch):
    """Shapes of every jax.Array that jsae.evals turns into a numpy array while the fixture is active."""
    import types

    import jsae.evals

    shapes = []

    def asarray(a, *args, **kwargs):
        if isinstance(a, jax.Array):
            shapes.append(tuple(a.shape))
        return np.asarray(a, *args, **kwargs)

    proxy = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    proxy.asarray = asarray
    monkeypatch.setattr(jsae.evals, "np", proxy)
    return shapes


def test_latents_are_reduced_on_their_device(host_copies):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, CTX, D_IN)).astype(np.float32)
    x_hat = x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
    acts = np.where(rng.random((ROWS, CTX, D_SAE)) < 0.1, rng.random((ROWS, CTX, D_SAE)), 0).astype(np.float32)
    mask = rng.random((ROWS, CTX)) < 0.8
    mask[0] = False  # a row with nothing counted

    on_device = SparsityVarianceMetrics(D_SAE)
    on_device.update(x, x_hat, jnp.asarray(acts), mask)
    assert host_copies and all(shape[-1] != D_SAE or len(shape) == 1 for shape in host_copies), host_copies

    # the same definitions on the host (SAELens' get_sparsity_and_variance_metrics)
    flat = mask.reshape(-1)
    fa = acts.reshape(-1, D_SAE)[flat].astype(np.float64)
    got, density = on_device.result(), on_device.feature_metrics()
    assert got["l0"] == pytest.approx(np.mean(np.sum(fa != 0, -1)), rel=1e-12)
    assert got["l1"] == pytest.approx(np.mean(np.sum(np.abs(fa), -1)), rel=1e-6)
    fired = (acts * mask[..., None]) != 0
    np.testing.assert_array_equal(density["feature_density"], fired.sum((0, 1)) / mask.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(density["consistent_activation_heuristic"],
                                       fired.sum((0, 1)) / (fired.sum(1) > 0).sum(0))
    assert jax.devices()[0] in jnp.asarray(acts).devices()
