"""Data parallelism: one device, a user's jax.pmap and jsae's shard_map driver give the same SAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import activation_batches, relative

import jsae

N_DEV, D_IN, D_SAE, BATCH, STEPS = 8, 16, 64, 128, 50

CONFIGS = {
    "standard": jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=1.0),
    "topk": jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),  # the sparse path on CPU (with dead latents)
    "topk_dense": jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, topk_implementation="dense"),
    "jumprelu": jsae.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.3, jumprelu_bandwidth=0.2),
}


def make_batches(seed=0):
    return activation_batches(STEPS, BATCH, D_IN, seed)


def train_cfg(sae_cfg, **kw):
    kw = dict(total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, lr=3e-3, dead_feature_window=10,
              progress_bar=False) | kw
    return jsae.TrainConfig(sae=sae_cfg, **kw)



@pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 8 (forced host) devices")
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_single_pmap_and_shard_map_agree(arch):
    cfg = train_cfg(CONFIGS[arch])
    data = make_batches()

    # one device, the plain step
    step = jax.jit(jsae.make_train_step(cfg))
    single = jsae.init_train_state(cfg)
    for batch in data:
        single, _ = step(single, batch)

    # a user's own pmap over 8 devices
    pstep = jax.pmap(jsae.make_train_step(cfg, axis_name="batch"), axis_name="batch")
    replicated = jax.tree.map(lambda x: jnp.stack([x] * N_DEV), jsae.init_train_state(cfg))
    for batch in data:
        replicated, metrics = pstep(replicated, batch.reshape(N_DEV, BATCH // N_DEV, D_IN))
        jax.block_until_ready(metrics)  # XLA's CPU collectives abort when many steps are in flight
    pmapped = jax.tree.map(lambda x: x[0], replicated)

    # jsae's driver: jit + shard_map over a Mesh of 8 devices
    trainer = jsae.Trainer(cfg.replace(n_devices=N_DEV))
    trainer.fit(iter(data))
    sharded = trainer.state

    for name, ref in single.params.items():
        assert relative(pmapped.params[name], ref) <= 1e-5, f"pmap {name}"
        assert relative(sharded.params[name], ref) <= 1e-5, f"shard_map {name}"
    np.testing.assert_array_equal(np.asarray(sharded.steps_since_fired), np.asarray(single.steps_since_fired))
    np.testing.assert_array_equal(np.asarray(pmapped.act_freq), np.asarray(single.act_freq))
    assert int(sharded.step) == int(single.step) == STEPS


@pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 8 (forced host) devices")
def test_metrics_are_global_under_shard_map():
    cfg = train_cfg(CONFIGS["standard"], total_training_tokens=BATCH)
    batch = make_batches()[0]
    _, m1 = jax.jit(jsae.make_train_step(cfg))(jsae.init_train_state(cfg), batch)
    pstep = jax.pmap(jsae.make_train_step(cfg, axis_name="b"), axis_name="b")
    state = jax.tree.map(lambda x: jnp.stack([x] * N_DEV), jsae.init_train_state(cfg))
    _, m8 = pstep(state, batch.reshape(N_DEV, -1, D_IN))
    for key in ("losses/overall_loss", "metrics/l0", "metrics/explained_variance", "losses/l1_loss"):
        assert float(m8[key][0]) == pytest.approx(float(m1[key]), rel=1e-5, abs=1e-5), key


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (forced host) devices")
def test_shard_map_gradient_is_the_global_mean_gradient():
    """Clipping and Adam hide a gradient scale error, so compare the first Adam moment directly."""
    cfg = train_cfg(CONFIGS["standard"], total_training_tokens=BATCH, max_grad_norm=1e9)
    batch = make_batches()[0]
    single, _ = jax.jit(jsae.make_train_step(cfg))(jsae.init_train_state(cfg), batch)
    trainer = jsae.Trainer(cfg.replace(n_devices=4))
    trainer.fit(iter([batch]))
    mu_single = single.opt_state[1].mu
    mu_sharded = trainer.state.opt_state[1].mu
    for name in mu_single:
        assert relative(mu_sharded[name], mu_single[name]) <= 1e-5, name
