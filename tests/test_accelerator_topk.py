"""Sparse TopK for accelerators, run on CPU: the GPU plan's sparse path (blockwise top-k, Pallas decoder in
interpret mode) against the dense path, the blockwise top-k against lax.top_k, the Pallas kernel against XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae
from jsae.backends import pallas_decoder
from jsae.backends.accelerator import blockwise_top_k, top_k_block
from jsae.saes import _ops, get_training_architecture

D_IN, D_SAE, K, N = 32, 512, 8, 48


def train_config(impl: str, **sae_changes) -> jsae.TrainConfig:
    sae = jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, topk_implementation=impl, **sae_changes)
    return jsae.TrainConfig(sae=sae, total_training_tokens=4 * N, train_batch_size_tokens=N)


def test_the_gpu_plan_takes_sparse_topk_only_when_asked():
    auto = jsae.resolve_plan(train_config("auto"), platform="gpu")
    assert (auto.topk, auto.top_k, auto.sparse_products) == ("dense", "xla", None)
    plan = jsae.resolve_plan(train_config("sparse"), platform="gpu")
    assert (plan.topk, plan.top_k, plan.sparse_products) == ("sparse", "blockwise", "pallas")
    ops = plan.ops()
    assert ops.sparse_topk and ops.top_k is blockwise_top_k
    assert ops.gather_rows_weighted.func is pallas_decoder.gather_rows_weighted
    assert ops.gather_rows_weighted.keywords == {"interpret": True}  # no GPU here: Pallas' interpreter
    tpu = jsae.resolve_plan(train_config("sparse"), platform="tpu")
    assert (tpu.topk, tpu.top_k, tpu.sparse_products) == ("sparse", "blockwise", "xla")


def loss_and_grads(plan, params, x, dead_mask, cfg):
    arch = get_training_architecture("topk")
    ops = plan.ops()

    def loss(p):
        out = arch.forward(p, x, cfg=cfg.sae, coefficients={}, dead_mask=dead_mask, ops=ops)
        return out.loss, out.losses

    (total, losses), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return total, losses, grads


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 5, D_SAE])
def test_the_gpu_plans_sparse_topk_on_cpu_equals_the_dense_path(rescale, n_dead):
    sparse_cfg = train_config("sparse", rescale_acts_by_decoder_norm=rescale)
    dense_cfg = train_config("dense", rescale_acts_by_decoder_norm=rescale)
    sparse_plan = jsae.resolve_plan(sparse_cfg, platform="gpu")
    dense_plan = jsae.resolve_plan(dense_cfg, platform="gpu")
    key_p, key_b, key_x = jax.random.split(jax.random.key(0), 3)
    params = dict(jsae.init_train_state(sparse_cfg).params)
    params["b_enc"] = 0.1 * jax.random.normal(key_b, (D_SAE,))
    params["b_dec"] = 0.1 * jax.random.normal(key_p, (D_IN,))
    x = jax.random.normal(key_x, (N, D_IN))
    dead_mask = jnp.arange(D_SAE) < n_dead
    total_s, losses_s, grads_s = loss_and_grads(sparse_plan, params, x, dead_mask, sparse_cfg)
    total_d, losses_d, grads_d = loss_and_grads(dense_plan, params, x, dead_mask, dense_cfg)
    np.testing.assert_allclose(total_s, total_d, rtol=1e-5, atol=1e-6)
    for name in losses_d:
        np.testing.assert_allclose(losses_s[name], losses_d[name], rtol=1e-5, atol=1e-6)
    if n_dead:
        assert float(losses_d["auxiliary_reconstruction_loss"]) > 0
    for name, grad in grads_d.items():
        scale = float(jnp.max(jnp.abs(grad))) or 1.0
        np.testing.assert_allclose(grads_s[name] / scale, grad / scale, atol=1e-5, err_msg=name)


def test_the_gpu_plans_sparse_step_trains_as_the_dense_one():
    from tests.train_helpers import activation_batches

    results = {}
    for impl in ("sparse", "dense"):
        cfg = train_config(impl)
        step = jax.jit(jsae.make_train_step(cfg, plan=jsae.resolve_plan(cfg, platform="gpu")))
        state = jsae.init_train_state(cfg)
        losses = []
        for batch in activation_batches(3, N, D_IN):
            state, metrics = step(state, jnp.asarray(batch))
            losses.append(float(metrics["losses/overall_loss"]))
        results[impl] = (losses, state.params)
    np.testing.assert_allclose(results["sparse"][0], results["dense"][0], rtol=1e-5)
    for name, value in results["dense"][1].items():
        np.testing.assert_allclose(results["sparse"][1][name], value, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("m, k", [(512, 1), (512, 8), (1024, 64), (1000, 32), (2048, 512), (768, 384)])
def test_blockwise_top_k_equals_lax_top_k(m, k):
    # k up to d_in / 2 of the aux-k loss: (2048, 512) and (768, 384) have k = m / 4 and m / 2
    x = jax.random.normal(jax.random.key(m + k), (6, m))
    for block in {top_k_block(m, k), 128, 200, m // 2}:
        values, indices = blockwise_top_k(x, k, block=block)
        expected_values, expected_indices = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(indices, expected_indices)
    # ties (rounded values) and -inf entries (the aux-k loss masks live latents with -inf) resolve as in lax.top_k
    tied = jnp.where(x > 1.5, -jnp.inf, jnp.round(x * 2))
    for block in (128, 200):
        values, indices = blockwise_top_k(tied, k, block=block)
        expected_values, expected_indices = jax.lax.top_k(tied, k)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(indices, expected_indices)


def test_blockwise_top_k_gradient_is_lax_top_ks():
    x = jax.random.normal(jax.random.key(3), (4, 1024))
    weights = jax.random.normal(jax.random.key(4), (4, 64))

    def through(top_k):
        return jax.grad(lambda v: jnp.sum(top_k(v, 64)[0] * weights))(x)

    np.testing.assert_array_equal(through(lambda v, k: blockwise_top_k(v, k, block=128)), through(jax.lax.top_k))
    assert top_k_block(1024, 64) == 256 and top_k_block(256, 64) is None


@pytest.mark.parametrize("n, k, m, d", [(48, 8, 512, 32), (37, 5, 64, 48), (8, 32, 128, 768)])
def test_pallas_decoder_in_interpret_mode_equals_xla(n, k, m, d):
    kw, ki, kt = jax.random.split(jax.random.key(n), 3)
    weights = jax.random.normal(kw, (n, k))
    indices = jax.random.randint(ki, (n, k), 0, m)
    table = jax.random.normal(kt, (m, d))
    kernel = jax.jit(lambda w, i, t: pallas_decoder.gather_rows_weighted(w, i, t, interpret=True))
    np.testing.assert_allclose(kernel(weights, indices, table), _ops.gather_rows_weighted(weights, indices, table),
                               rtol=1e-5, atol=1e-5)
    # bfloat16 inputs, float32 result (a bfloat16 compute_dtype plan)
    bf = jnp.bfloat16
    got = pallas_decoder.gather_rows_weighted(weights.astype(bf), indices, table.astype(bf), out_dtype=jnp.float32,
                                              interpret=True)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _ops.gather_rows_weighted(weights.astype(bf), indices, table.astype(bf),
                                                              out_dtype=jnp.float32), rtol=1e-5, atol=1e-5)


def test_the_gpu_sparse_plan_under_shard_map_equals_the_dense_one():
    # jsae's shard_map driver around the GPU sparse plan on CPU (where Pallas' interpreter, unlike a GPU,
    # cannot run the kernel on varying axes, the decoder takes XLA's gather) and the blockwise top-k
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    batch = jax.random.normal(jax.random.key(5), (N, D_IN))
    results = {}
    for impl in ("sparse", "dense"):
        cfg = train_config(impl).replace(dead_feature_window=1)
        step = jsae.make_train_step(cfg, "data", plan=jsae.resolve_plan(cfg, platform="gpu"))
        sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                                        out_specs=(PartitionSpec(), PartitionSpec())))
        state, metrics = sharded(jsae.init_train_state(cfg), batch)
        results[impl] = (metrics, state.params)
    for name in ("losses/mse_loss", "losses/auxiliary_reconstruction_loss"):
        np.testing.assert_allclose(results["sparse"][0][name], results["dense"][0][name], rtol=1e-5, atol=1e-6)
    for name, value in results["dense"][1].items():
        np.testing.assert_allclose(results["sparse"][1][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
