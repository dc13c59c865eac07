"""SAEs under jax.jit, jax.vmap over stacked SAEs, and jax.pmap; params are a plain pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae

CONFIGS = {
    "standard": jsae.StandardSAEConfig(d_in=16, d_sae=64),
    "topk": jsae.TopKSAEConfig(d_in=16, d_sae=64, k=8, rescale_acts_by_decoder_norm=True),
    "jumprelu": jsae.JumpReLUSAEConfig(d_in=16, d_sae=64, normalize_activations="layer_norm"),
    "gated": jsae.GatedSAEConfig(d_in=16, d_sae=64, normalize_activations="constant_norm_rescale"),
    "skip_transcoder": jsae.SkipTranscoderConfig(d_in=16, d_sae=64, d_out=12),
}


def random_sae(cfg, seed):
    """An SAE with every parameter random (fresh init leaves biases at zero)."""
    sae = jsae.SAE.from_config(cfg, seed=seed)
    keys = jax.random.split(jax.random.key(seed + 100), len(sae.params))
    params = {
        name: (jax.random.normal(k, v.shape, v.dtype) * (0.1 if name in ("r_mag", "threshold") else 1.0))
        for k, (name, v) in zip(keys, sorted(sae.params.items()), strict=True)
    }
    if "threshold" in params:
        params["threshold"] = jnp.abs(params["threshold"])
    return sae.replace(params=params)


@pytest.fixture(params=list(CONFIGS))
def cfg(request):
    return CONFIGS[request.param]


def test_jit_over_params_matches_eager_and_compiles_once(cfg):
    sae = random_sae(cfg, 0)
    x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    traces = []

    def encode_decode(params, x):
        traces.append(1)
        feats, _, state = sae.module.apply({"params": params}, x, method="encode_with_state")
        return feats, sae.module.apply({"params": params}, feats, state, method="decode")

    fn = jax.jit(encode_decode)
    feats, recon = fn(sae.params, x)
    np.testing.assert_allclose(feats, sae.encode(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recon, sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    other = random_sae(cfg, 1)
    fn(other.params, x + 1)  # new values, same shapes: no retrace
    assert len(traces) == 1


def test_jit_over_sae_pytree(cfg):
    sae = random_sae(cfg, 2)
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(lambda s, x: s(x))(sae, x), sae(x), rtol=1e-5, atol=1e-5)


def test_vmap_over_two_stacked_saes(cfg):
    saes = [random_sae(cfg, 3), random_sae(cfg, 4)]
    xs = np.random.default_rng(2).normal(size=(2, 7, 16)).astype(np.float32)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(s.params for s in saes))
    module = saes[0].module
    out = jax.vmap(lambda p, x: module.apply({"params": p}, x))(stacked, xs)
    for i, sae in enumerate(saes):
        np.testing.assert_allclose(out[i], sae(xs[i]), rtol=1e-5, atol=1e-5)
    # the SAE objects themselves stack too
    stacked_sae = jax.tree.map(lambda *a: jnp.stack(a), *saes)
    feats = jax.vmap(lambda s, x: s.encode(x))(stacked_sae, xs)
    np.testing.assert_allclose(feats[1], saes[1].encode(xs[1]), rtol=1e-5, atol=1e-5)


def test_pmap_over_devices(cfg):
    devices = jax.devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    saes = [random_sae(cfg, 5), random_sae(cfg, 6)]
    xs = np.random.default_rng(3).normal(size=(2, 4, 16)).astype(np.float32)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(s.params for s in saes))
    module = saes[0].module
    out = jax.pmap(lambda p, x: module.apply({"params": p}, x, method="encode"), devices=devices)(stacked, xs)
    for i, sae in enumerate(saes):
        np.testing.assert_allclose(out[i], sae.encode(xs[i]), rtol=1e-5, atol=1e-5)


def test_grad_through_forward(cfg):
    """The params pytree differentiates like any other (what training builds on)."""
    sae = random_sae(cfg, 7)
    x = np.random.default_rng(4).normal(size=(6, 16)).astype(np.float32)
    target = x[:, : cfg.d_out]
    grads = jax.grad(lambda p: jnp.sum((sae.module.apply({"params": p}, x) - target) ** 2))(sae.params)
    assert set(grads) == set(sae.params)
    assert all(g.shape == sae.params[k].shape for k, g in grads.items())
    assert float(jnp.abs(grads["W_dec"]).sum()) > 0
