"""The sparse TopK training path gives the dense path's numbers: losses, gradients, steps, metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from saelens_helpers import rel_err

import jsae
from jsae import backends
from jsae._errors import ConfigError
from jsae.saes import _ops, _sparse_topk, topk
from jsae.saes._training import init_training_params

D_IN, N = 16, 40  # 40 tokens: two full backward blocks of 16 and a tail of 8
BLOCKWISE = {"d_sae": 512, "k": 4}  # 2 * k * TOPK_BLOCK <= d_sae: the blockwise top-k
SINGLE = {"d_sae": 96, "k": 6}  # too few blocks: one top-k over the row
DEAD = {"none": 0, "few": 3, "k_aux": 8, "many": 200}  # up to k_aux = D_IN / 2 dead: the column path


def configs(**kw):
    return (topk.TopKTrainingSAEConfig(d_in=D_IN, **kw, topk_implementation="dense"),
            topk.TopKTrainingSAEConfig(d_in=D_IN, **kw, topk_implementation="sparse"))


def random_params(cfg, seed=0):
    """Training init plus noise, so biases and decoder norms are all non-trivial."""
    params = init_training_params(cfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(params))
    return {name: value + 0.1 * jax.random.normal(key, value.shape)
            for key, (name, value) in zip(keys, sorted(params.items()), strict=True)}


def dead_mask(d_sae, n_dead, seed=2):
    mask = np.zeros(d_sae, bool)
    mask[np.random.default_rng(seed).permutation(d_sae)[:n_dead]] = True
    return jnp.asarray(mask)


def plan_of(sae_cfg, **kw):
    return jsae.resolve_plan(jsae.TrainConfig(sae=sae_cfg, total_training_tokens=N, train_batch_size_tokens=N), **kw)


def loss_and_grads(cfg, params, x, dead, ops=None):
    ops = ops or plan_of(cfg).ops()

    def loss_fn(p):
        out = topk.training_forward(p, x, cfg=cfg, coefficients={}, dead_mask=dead, ops=ops)
        return out.loss, out

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.mark.parametrize("shape", ["blockwise", "single"])
@pytest.mark.parametrize("dead", list(DEAD))
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_losses_and_gradients_match_dense(rescale, apply_b_dec, dead, shape):
    kw = (BLOCKWISE if shape == "blockwise" else SINGLE) | {
        "rescale_acts_by_decoder_norm": rescale, "apply_b_dec_to_input": apply_b_dec, "aux_loss_coefficient": 0.7}
    dense_cfg, sparse_cfg = configs(**kw)
    assert plan_of(sparse_cfg).ops().sparse_topk and not plan_of(dense_cfg).ops().sparse_topk
    params = random_params(dense_cfg)
    x = jax.random.normal(jax.random.key(3), (N, D_IN)) * 1.5 + 0.2
    mask = dead_mask(kw["d_sae"], DEAD[dead])

    (loss_d, out_d), grads_d = loss_and_grads(dense_cfg, params, x, mask)
    (loss_s, out_s), grads_s = loss_and_grads(sparse_cfg, params, x, mask)

    assert set(out_s.losses) == set(out_d.losses)
    for name, value in out_d.losses.items():
        assert rel_err(out_s.losses[name], value) <= 1e-5, name
    assert (float(out_d.losses["auxiliary_reconstruction_loss"]) > 0) == (dead != "none")
    assert rel_err(loss_s, loss_d) <= 1e-5
    for name, g in grads_d.items():
        assert float(jnp.abs(g).max()) > 0, name
        assert rel_err(grads_s[name], g) <= 1e-5, f"gradient of {name}"
    assert rel_err(out_s.sae_out, out_d.sae_out) <= 1e-5
    assert rel_err(out_s.hidden_pre, out_d.hidden_pre) <= 1e-6
    np.testing.assert_array_equal(np.asarray(out_s.feature_acts != 0), np.asarray(out_d.feature_acts != 0))
    assert rel_err(out_s.feature_acts, out_d.feature_acts) <= 1e-6
    np.testing.assert_array_equal(np.asarray(out_s.fired_counts()), np.asarray(out_d.fired_counts()))
    assert out_d.top_indices is None and out_s.top_indices.shape == (N, kw["k"])


def amx() -> bool:
    from jsae.backends.cpu import kernels

    return kernels.encoder_top_k_available()


@pytest.mark.skipif(not amx(), reason="encoder_top_k needs a CPU with AMX")
@pytest.mark.parametrize("dead", ["none", "few", "many"])
@pytest.mark.parametrize("rescale", [True, False])
def test_screened_encoder_top_k_matches_the_dense_product(rescale, dead, monkeypatch):
    # With AMX the sparse forward screens its top-k (ops.encoder_top_k) and never forms the
    # encoder product; the aux-k loss forms what it needs. Same numbers as with the product.
    monkeypatch.setattr(backends, "SCREEN_MIN_D_SAE", 0)  # screened at any width, as from 4096 latents on
    kw = BLOCKWISE | {"rescale_acts_by_decoder_norm": rescale, "aux_loss_coefficient": 0.7}
    _, sparse_cfg = configs(**kw)
    params = random_params(sparse_cfg)
    x = jax.random.normal(jax.random.key(4), (N, D_IN)) * 1.5 + 0.2
    mask = dead_mask(kw["d_sae"], DEAD[dead])
    plan = plan_of(sparse_cfg)
    assert plan.encoder_screen
    forward = _sparse_topk.sparse_topk_forward(x, params["b_dec"], params["W_enc"], params["b_enc"], params["W_dec"],
                                               k=kw["k"], rescale=rescale, apply_b_dec=True, ops=plan.ops())
    assert forward.product is None
    (loss_s, out_s), grads_s = loss_and_grads(sparse_cfg, params, x, mask)
    monkeypatch.setenv("JSAE_ENCODER_TOP_K", "0")
    assert not plan_of(sparse_cfg).encoder_screen
    (loss_p, out_p), grads_p = loss_and_grads(sparse_cfg, params, x, mask)
    np.testing.assert_array_equal(np.asarray(out_s.top_indices), np.asarray(out_p.top_indices))
    assert rel_err(loss_s, loss_p) <= 1e-6
    assert (float(out_s.losses["auxiliary_reconstruction_loss"]) > 0) == (dead != "none")
    for name, g in grads_p.items():
        assert rel_err(grads_s[name], g) <= 1e-6, f"gradient of {name}"


@pytest.mark.skipif(not amx(), reason="encoder_top_k needs a CPU with AMX")
def test_the_top_k_is_screened_from_screen_min_d_sae_latents():
    width = backends.SCREEN_MIN_D_SAE
    assert plan_of(topk.TopKTrainingSAEConfig(d_in=16, d_sae=width, k=4)).encoder_screen
    assert not plan_of(topk.TopKTrainingSAEConfig(d_in=16, d_sae=width - 4, k=4)).encoder_screen
    assert not plan_of(topk.TopKTrainingSAEConfig(d_in=16, d_sae=width, k=4, dtype="bfloat16")).encoder_screen


@pytest.mark.parametrize("dead", ["none", "many"])
def test_fewer_active_ranks_match_dense(dead):
    """A traced k below cfg.k (sweeps over k) keeps the first k ranks on both paths alike."""
    dense_cfg, sparse_cfg = configs(**BLOCKWISE)
    params = random_params(dense_cfg)
    x = jax.random.normal(jax.random.key(3), (N, D_IN))
    mask = dead_mask(BLOCKWISE["d_sae"], DEAD[dead])

    def run(cfg, k):
        ops = plan_of(cfg).ops()

        def loss_fn(p):
            out = topk.training_forward(p, x, cfg=cfg, coefficients={}, dead_mask=mask, ops=ops, k=k)
            return out.loss, out

        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    k = jnp.asarray(BLOCKWISE["k"] - 2, jnp.int32)
    (loss_d, out_d), grads_d = run(dense_cfg, k)
    (loss_s, out_s), grads_s = run(sparse_cfg, k)
    assert rel_err(loss_s, loss_d) <= 1e-5
    for name, g in grads_d.items():
        assert rel_err(grads_s[name], g) <= 1e-5, f"gradient of {name}"
    np.testing.assert_array_equal(np.asarray(out_s.fired_counts()), np.asarray(out_d.fired_counts()))
    assert float(jnp.sum(out_s.fired_counts())) == N * int(k)


def test_input_gradient_matches_dense():
    """The custom backward's gradient reaching x (unused in training, where x is data) is right too."""
    dense_cfg, _ = configs(**BLOCKWISE)
    params = random_params(dense_cfg)
    x = jax.random.normal(jax.random.key(4), (N, D_IN))
    module = topk.TopKSAE(dense_cfg)
    cotangent = jax.random.normal(jax.random.key(5), (N, D_IN))

    def dense(x):
        return jnp.sum(module.apply({"params": params}, x) * cotangent)

    def sparse(x):
        out = _sparse_topk.sparse_topk_forward(x, params["b_dec"], params["W_enc"], params["b_enc"], params["W_dec"],
                                               k=dense_cfg.k, rescale=True, apply_b_dec=True)
        return jnp.sum(out.sae_out * cotangent)

    assert rel_err(jax.grad(sparse)(x), jax.grad(dense)(x)) <= 1e-5


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("kind", ["distinct", "ties", "all_equal"])
def test_blockwise_top_k_is_lax_top_k(kind, kernel):
    # On CPU the pre-activations' top-k is jsae's kernel (kernels.top_k_affine); the reference is blockwise.
    from jsae.backends import cpu

    top_k_affine = cpu.kernel_top_k_affine if kernel else _ops.top_k_affine
    n, m, k = 64, 2048, 16
    rng = np.random.default_rng(0)
    product = {"distinct": rng.normal(size=(n, m)), "ties": rng.integers(0, 6, size=(n, m)),
               "all_equal": np.zeros((n, m))}[kind].astype(np.float32)
    b_enc = np.zeros(m, np.float32) if kind != "distinct" else rng.normal(size=m).astype(np.float32)
    norms = rng.uniform(0.5, 2, size=m).astype(np.float32) if kind == "distinct" else np.ones(m, np.float32)
    assert 2 * k * _ops.TOPK_BLOCK <= m
    values, indices = jax.jit(top_k_affine, static_argnums=3)(product, b_enc, norms, k)
    want_values, want_indices = jax.lax.top_k((product + b_enc) * norms, k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    got = np.take_along_axis((product + b_enc) * norms, np.asarray(indices), axis=-1)
    np.testing.assert_array_equal(got, np.asarray(values))  # the indices hold those values
    if kind != "ties" or kernel:  # blockwise, with ties between blocks another equal latent may be picked
        np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))


@pytest.mark.parametrize("cores", [2, 3])
def test_row_blocks_top_k_is_lax_top_k(cores, monkeypatch):
    from jsae.backends import cpu

    monkeypatch.setattr(cpu, "cpu_cores", lambda: cores)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, size=(cpu.SPLIT_TOP_K_MIN_ROWS + 7, 96)).astype(np.float32)  # ties in every row
    jitted = jax.jit(lambda a: cpu.split_top_k(a, 8))  # a fresh function: no trace cached under other cores
    text = jitted.lower(x).compile().as_text()
    assert text.count('custom_call_target="TopK"') == cores  # one top-k per block of rows
    values, indices = jitted(x)
    want_values, want_indices = jax.lax.top_k(x, 8)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    # Under vmap (sweeps) as well.
    stacked = np.stack([x, x[::-1]])
    values, indices = jax.jit(jax.vmap(lambda a: cpu.split_top_k(a, 8)))(stacked)
    want_values, want_indices = jax.vmap(lambda a: jax.lax.top_k(a, 8))(stacked)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))


def run_steps(sae_cfg, batches, platform=None, **kw):
    cfg = jsae.TrainConfig(sae=sae_cfg, total_training_tokens=len(batches) * N, train_batch_size_tokens=N, lr=3e-3,
                           dead_feature_window=2, progress_bar=False, **kw)
    step = jax.jit(jsae.make_train_step(cfg, plan=jsae.resolve_plan(cfg, platform=platform)))
    state = jsae.init_train_state(cfg)
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


@pytest.mark.parametrize("platform", [None, "gpu"])
@pytest.mark.parametrize("rescale", [True, False])
def test_training_steps_match_dense(rescale, platform):
    # platform "gpu": the plan an accelerator gets (XLA's gathers and scatters, no CPU kernels), run here.
    dense_cfg, sparse_cfg = configs(**BLOCKWISE, rescale_acts_by_decoder_norm=rescale)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(N, D_IN)) * rng.uniform(0.5, 2, D_IN) + 0.3).astype(np.float32) for _ in range(6)]
    dense, dense_metrics = run_steps(dense_cfg, batches)
    sparse, sparse_metrics = run_steps(sparse_cfg, batches, platform=platform)

    for name, ref in dense.params.items():
        assert rel_err(sparse.params[name], ref) <= 1e-5, name
    np.testing.assert_array_equal(np.asarray(sparse.steps_since_fired), np.asarray(dense.steps_since_fired))
    np.testing.assert_array_equal(np.asarray(sparse.act_freq), np.asarray(dense.act_freq))
    assert dense_metrics[-1]["sparsity/dead_features"] > 0  # the aux loss ran in later steps
    assert dense_metrics[-1]["losses/auxiliary_reconstruction_loss"] > 0
    for want, got in zip(dense_metrics, sparse_metrics, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            assert float(got[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    assert dense_metrics[0]["metrics/l0"] == BLOCKWISE["k"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced host) devices")
def test_sparse_path_under_pmap_matches_one_device():
    _, sparse_cfg = configs(**BLOCKWISE)
    cfg = jsae.TrainConfig(sae=sparse_cfg, total_training_tokens=4 * 64, train_batch_size_tokens=64, lr=3e-3,
                           dead_feature_window=1, progress_bar=False)
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(64, D_IN)).astype(np.float32) for _ in range(4)]
    step = jax.jit(jsae.make_train_step(cfg))
    single = jsae.init_train_state(cfg)
    pstep = jax.pmap(jsae.make_train_step(cfg, axis_name="b"), axis_name="b")
    replicated = jax.tree.map(lambda x: jnp.stack([x] * 8), jsae.init_train_state(cfg))
    for batch in batches:
        single, _ = step(single, batch)
        replicated, metrics = pstep(replicated, batch.reshape(8, 8, D_IN))
        jax.block_until_ready(metrics)
    for name, ref in single.params.items():
        assert rel_err(replicated.params[name][0], ref) <= 1e-5, name
    np.testing.assert_array_equal(np.asarray(replicated.act_freq[0]), np.asarray(single.act_freq))


def sparse_in_plan(sae_cfg, platform=None) -> bool:
    return plan_of(sae_cfg, platform=platform).topk == "sparse"


def test_choice_of_implementation():
    assert topk.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=32).topk_implementation == "auto"
    wide = topk.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=32)
    assert sparse_in_plan(wide) and not sparse_in_plan(wide, "gpu")
    narrow = topk.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=16384 // backends.SPARSE_MIN_D_SAE_PER_K + 1)
    assert not sparse_in_plan(narrow)
    assert sparse_in_plan(topk.TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, topk_implementation="sparse"), "gpu")
    assert not sparse_in_plan(topk.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=32, topk_implementation="dense"))


@pytest.mark.parametrize("kernels_there", [True, False])
def test_auto_goes_sparse_at_narrower_saes_with_the_cpu_kernels(kernels_there, monkeypatch):
    from jsae.backends.cpu import kernels

    monkeypatch.setattr(kernels, "available", lambda: kernels_there)
    middle = topk.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=16384 // backends.SPARSE_MIN_D_SAE_PER_K_XLA + 1)
    assert sparse_in_plan(middle) == kernels_there
    wide = topk.TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=16384 // backends.SPARSE_MIN_D_SAE_PER_K_XLA)
    assert sparse_in_plan(wide)


def test_unknown_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"topk_implementation must be one of \['auto', 'dense', 'sparse'\], "
                                          r"got 'fast'"):
        topk.TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, topk_implementation="fast")


def test_saved_config_keeps_the_choice_as_training_detail():
    cfg = topk.TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, topk_implementation="sparse")
    inference = cfg.inference_config()
    assert "topk_implementation" not in inference.to_dict()
    assert inference.metadata.training_architecture_details["topk_implementation"] == "sparse"


@pytest.mark.parametrize("dead", ["none", "many"])
def test_bfloat16_runs_close_to_dense(dead):
    dense_cfg, sparse_cfg = configs(**BLOCKWISE, dtype="bfloat16")
    params = {k: v.astype(jnp.bfloat16) for k, v in random_params(dense_cfg).items()}
    x = jax.random.normal(jax.random.key(3), (N, D_IN)).astype(jnp.bfloat16)
    mask = dead_mask(BLOCKWISE["d_sae"], DEAD[dead])
    (loss_d, _), grads_d = loss_and_grads(dense_cfg, params, x, mask)
    (loss_s, _), grads_s = loss_and_grads(sparse_cfg, params, x, mask)
    assert rel_err(loss_s, loss_d) <= 2e-2
    for name, g in grads_d.items():
        assert grads_s[name].dtype == jnp.bfloat16
        assert rel_err(grads_s[name], g) <= 5e-2, name

