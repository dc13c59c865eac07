"""The dense CPU kernels (ReLU and JumpReLU steps on a BLAS sgemm) give XLA's numbers: the
kernels against float64, the training forward's losses and gradients against the XLA path, whole
steps, vmap, and the cases that keep XLA's path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from saelens_helpers import rel_err

import jsae
from jsae._errors import ConfigError
from jsae.backends.cpu import dense, kernels
from jsae.saes import jumprelu, standard
from jsae.saes._training import init_training_params

pytestmark = pytest.mark.skipif(not kernels.dense_available(), reason="the dense CPU kernels are not available")

# 300 tokens and 600 latents: forward blocks of 256 tokens and a tail of 44, backward blocks of
# 256 latents and a tail of 88 (kernels.dense_kernels.cc's BlockSize on 1-2 threads).
N, D_IN, D_SAE = 300, 24, 600


def operands(seed=0, jump=False):
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, D_IN)).astype(np.float32)
    W_enc = (0.2 * r.standard_normal((D_IN, D_SAE))).astype(np.float32)
    b_enc = (0.1 * r.standard_normal(D_SAE)).astype(np.float32)
    W_dec = (0.2 * r.standard_normal((D_SAE, D_IN))).astype(np.float32)
    threshold = np.abs(0.3 * r.standard_normal(D_SAE)).astype(np.float32) if jump else None
    return x, W_enc, b_enc, W_dec, threshold


def reference_forward(x, W_enc, b_enc, W_dec, threshold):
    pre = x.astype(np.float64) @ W_enc + b_enc
    on = pre > 0 if threshold is None else pre > threshold
    h = np.where(on, pre, 0.0)
    return pre, on, h, h @ W_dec


@pytest.mark.parametrize("jump", [False, True])
def test_dense_encode_matches_float64(jump):
    x, W_enc, b_enc, W_dec, threshold = operands(jump=jump)
    h, pre, lin, sums, fired, l0 = jax.jit(kernels.dense_encode)(x, W_enc, b_enc, W_dec, threshold)
    want_pre, on, want_h, want_lin = reference_forward(x, W_enc, b_enc, W_dec, threshold)
    assert rel_err(h, want_h) <= 1e-6 and rel_err(lin, want_lin) <= 1e-6
    assert rel_err(sums, want_h.sum(0)) <= 1e-6
    np.testing.assert_array_equal(np.asarray(h) != 0, on)  # no pre-activation within rounding of 0
    np.testing.assert_array_equal(fired, on.sum(0))
    np.testing.assert_array_equal(l0, on.sum(1))
    if jump:
        assert rel_err(pre, want_pre) <= 1e-6
    else:
        assert pre.shape == (0,)


@pytest.mark.parametrize("jump,ste_to_input", [(False, False), (True, False), (True, True)])
def test_dense_backward_matches_float64(jump, ste_to_input):
    x, W_enc, b_enc, W_dec, threshold = operands(jump=jump)
    bandwidth = 0.2
    h, pre, *_ = kernels.dense_encode(x, W_enc, b_enc, W_dec, threshold)
    r = np.random.default_rng(5)
    g_lin = r.standard_normal((N, D_IN)).astype(np.float32)
    g_sums = r.standard_normal(D_SAE).astype(np.float32)
    g_l0 = r.standard_normal(N).astype(np.float32)
    got = jax.jit(lambda *a: kernels.dense_backward(*a, bandwidth=bandwidth, ste_to_input=ste_to_input))(
        x, W_dec, h, pre, threshold, g_lin, g_sums, g_l0)
    want_pre, on, want_h, _ = reference_forward(x, W_enc, b_enc, W_dec, threshold)
    a = g_lin.astype(np.float64) @ W_dec.T + g_sums
    g_pre = np.where(on, a, 0.0)
    g_threshold = np.zeros(D_SAE)
    if jump:
        u = (want_pre - threshold) / bandwidth
        ste = ((u > -0.5) & (u < 0.5)) * (threshold * a + g_l0[:, None]) / bandwidth
        g_threshold = -ste.sum(0)
        assert np.count_nonzero(ste) > 100  # the estimator's window holds many entries
        if ste_to_input:
            g_pre = g_pre + ste
    want = (x.T.astype(np.float64) @ g_pre, g_pre.sum(0), want_h.T @ g_lin, g_threshold)
    for name, value, expected in zip(("W_enc", "b_enc", "W_dec", "threshold"), got, want, strict=True):
        assert rel_err(value, expected) <= 1e-5, name


def test_dense_encode_keeps_xla_non_finite_values():
    """As XLA computes them: relu keeps NaN and inf, -inf becomes 0; JumpReLU's x * (x > threshold)
    (a select in XLA) gives 0 for NaN and -inf."""
    x, W_enc, b_enc, W_dec, threshold = operands(jump=True)
    x = x.copy()
    x[3, 0], x[7, 2], x[11, 5] = np.nan, np.inf, -np.inf
    for th in (None, threshold):
        h = kernels.dense_encode(x, W_enc, b_enc, W_dec, th)[0]
        pre = jnp.asarray(x) @ W_enc + b_enc
        want = jax.jit(lambda p, th: jax.nn.relu(p) if th is None else p * (p > th))(pre, th)
        bad = ~np.isfinite(np.asarray(pre))
        assert bad[[3, 7, 11]].all(axis=1).all()
        assert (~np.isfinite(np.asarray(want))).any()
        np.testing.assert_array_equal(np.asarray(h)[bad], np.asarray(want)[bad])


# ------------------------------------------------------------------ the training forward
CASES = {
    "standard": (standard, {"l1_coefficient": 0.7}),
    "standard, no b_dec in input": (standard, {"l1_coefficient": 0.7, "apply_b_dec_to_input": False}),
    "standard, layer_norm": (standard, {"l1_coefficient": 0.7, "normalize_activations": "layer_norm"}),
    "jumprelu": (jumprelu, {"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.3}),
    "jumprelu, ste to input": (jumprelu, {"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.3,
                                          "jumprelu_ste_to_input": True}),
    "jumprelu, quadratic": (jumprelu, {"l0_coefficient": 0.3, "jumprelu_sparsity_loss_mode": "quadratic",
                                       "target_l0": 40.0, "jumprelu_bandwidth": 0.3}),
}


def configs(module, **kw):
    cls = module.StandardTrainingSAEConfig if module is standard else module.JumpReLUTrainingSAEConfig
    return (cls(d_in=D_IN, d_sae=D_SAE, dense_implementation="xla", **kw),
            cls(d_in=D_IN, d_sae=D_SAE, dense_implementation="auto", **kw))


def random_params(cfg, seed=0):
    """Training init plus noise, so biases, thresholds and decoder norms are all non-trivial."""
    params = init_training_params(cfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(params))
    noisy = {name: value + 0.1 * jax.random.normal(key, value.shape)
             for key, (name, value) in zip(keys, sorted(params.items()), strict=True)}
    if "threshold" in noisy:
        noisy["threshold"] = jnp.abs(noisy["threshold"]) + 0.05
    return noisy


def plan_of(sae_cfg):
    return jsae.resolve_plan(jsae.TrainConfig(sae=sae_cfg, total_training_tokens=10**6, train_batch_size_tokens=N))


def loss_and_grads(module, cfg, params, x):
    coefficients = {name: jnp.float32(value) for name, (value, _) in cfg.coefficients().items()}
    ops = plan_of(cfg).ops()

    def loss_fn(p):
        out = module.training_forward(p, x, cfg=cfg, coefficients=coefficients, dead_mask=jnp.zeros(D_SAE, bool),
                                      ops=ops)
        return out.loss, out

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_gradients_match_xla(case):
    module, kw = CASES[case]
    xla_cfg, kernel_cfg = configs(module, **kw)
    assert plan_of(kernel_cfg).dense_step == "cpu_fused" and plan_of(xla_cfg).dense_step == "xla"
    params = random_params(xla_cfg)
    x = jax.random.normal(jax.random.key(3), (N, D_IN)) * 1.5 + 0.2
    (loss_x, out_x), grads_x = loss_and_grads(module, xla_cfg, params, x)
    (loss_k, out_k), grads_k = loss_and_grads(module, kernel_cfg, params, x)
    assert rel_err(loss_k, loss_x) <= 1e-6
    for name in out_x.losses:
        assert rel_err(out_k.losses[name], out_x.losses[name]) <= 1e-5, name
    assert set(grads_k) == set(grads_x)
    for name in grads_x:
        assert float(jnp.max(jnp.abs(grads_x[name]))) > 0, name
        assert rel_err(grads_k[name], grads_x[name]) <= 1e-5, name
    assert rel_err(out_k.sae_out, out_x.sae_out) <= 1e-6
    assert rel_err(out_k.feature_acts, out_x.feature_acts) <= 1e-6
    np.testing.assert_array_equal(out_k.fired_counts(), out_x.fired_counts())
    # the kernel path ran: a standard SAE's pre-activations are never written out there
    assert (out_k.hidden_pre is None) == (module is standard)


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_train_steps_match_xla(arch):
    """Five whole steps (clip, Adam, dead-latent counters, metrics) on either path."""
    module, kw = CASES[arch]
    states, metrics = [], []
    batches = [jax.random.normal(jax.random.key(10 + i), (N, D_IN)) for i in range(5)]
    for sae_cfg in configs(module, **kw):
        cfg = jsae.TrainConfig(sae=sae_cfg, total_training_tokens=10**6, train_batch_size_tokens=N, lr=1e-3)
        step = jax.jit(jsae.make_train_step(cfg))
        state = jsae.init_train_state(cfg)
        for batch in batches:
            state, m = step(state, batch)
        states.append(state)
        metrics.append(m)
    for name in states[0].params:
        assert rel_err(states[1].params[name], states[0].params[name]) <= 1e-5, name
    np.testing.assert_array_equal(states[1].act_freq, states[0].act_freq)
    np.testing.assert_array_equal(states[1].steps_since_fired, states[0].steps_since_fired)
    for name in ("losses/overall_loss", "metrics/l0", "metrics/explained_variance"):
        assert rel_err(metrics[1][name], metrics[0][name]) <= 1e-5, name


def test_vmapped_forward_is_one_call_per_member():
    """A sweep vmaps the step: each member's loss and gradients are its own call's."""
    module, kw = CASES["jumprelu"]
    _, cfg = configs(module, **kw)
    members = [random_params(cfg, seed) for seed in (0, 7)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    x = jax.random.normal(jax.random.key(4), (N, D_IN))
    coefficients = {"l0": jnp.float32(0.3)}
    ops = plan_of(cfg).ops()

    def loss(p):
        return module.training_forward(p, x, cfg=cfg, coefficients=coefficients,
                                       dead_mask=jnp.zeros(D_SAE, bool), ops=ops).loss

    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(stacked)
    for i, p in enumerate(members):
        one_loss, one_grads = jax.jit(jax.value_and_grad(loss))(p)
        assert float(losses[i]) == float(one_loss)
        for name in one_grads:
            np.testing.assert_array_equal(grads[name][i], one_grads[name])


def test_activations_are_not_differentiable():
    x, W_enc, b_enc, W_dec, _ = map(lambda a: None if a is None else jnp.asarray(a), operands())
    shift = jnp.zeros(D_IN)

    def through_h(W):
        return jnp.sum(dense.dense_forward(x, shift, W, b_enc, W_dec).h)

    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(through_h)(W_enc)
    # the differentiable outputs are differentiated exactly
    lin_grad = jax.grad(lambda W: jnp.sum(dense.dense_forward(x, shift, W, b_enc, W_dec).lin))(W_enc)
    pre = x @ W_enc + b_enc
    want = x.T @ jnp.where(pre > 0, jnp.sum(W_dec, axis=1), 0.0)
    assert rel_err(lin_grad, want) <= 1e-5


def test_configs_that_keep_xla():
    def fused(sae_cfg, **train):
        cfg = jsae.TrainConfig(sae=sae_cfg, total_training_tokens=10**4, train_batch_size_tokens=8, **train)
        return jsae.resolve_plan(cfg).dense_step == "cpu_fused"

    assert not fused(standard.StandardTrainingSAEConfig(d_in=8, d_sae=16, lp_norm=2.0))
    assert not fused(standard.StandardTrainingSAEConfig(d_in=8, d_sae=16, dtype="bfloat16"))
    assert not fused(jumprelu.JumpReLUTrainingSAEConfig(d_in=8, d_sae=16, jumprelu_sparsity_loss_mode="tanh"))
    assert not fused(jumprelu.JumpReLUTrainingSAEConfig(d_in=8, d_sae=16, pre_act_loss_coefficient=0.1))
    assert not fused(standard.StandardTrainingSAEConfig(d_in=8, d_sae=16), model_axis_size=2)  # XLA partitions
    assert fused(standard.StandardTrainingSAEConfig(d_in=8, d_sae=16))
    assert fused(jumprelu.JumpReLUTrainingSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(ConfigError, match="dense_implementation"):
        standard.StandardTrainingSAEConfig(d_in=8, d_sae=16, dense_implementation="blas")


def test_kernels_reject_bad_operands():
    x, W_enc, b_enc, W_dec, _ = operands()
    with pytest.raises(TypeError, match="float32"):
        kernels.dense_encode(x.astype(np.float16), W_enc, b_enc, W_dec, None)
    with pytest.raises(ValueError, match="dense_encode"):
        kernels.dense_encode(x, W_enc[:-1], b_enc, W_dec, None)


def test_each_blas_gives_the_same_numbers():
    """The checks above on the other BLAS (OpenBLAS where this process runs on MKL, MKL where it
    runs on OpenBLAS), in a process of their own: the BLAS is chosen once per process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if kernels.blas_library() is None:
        pytest.skip("no BLAS for the dense kernels here")
    other, name = (("openblas", "scipy_openblas") if "libmkl_rt" in kernels.blas_library() else ("mkl", "libmkl_rt"))
    env = os.environ | {"JSAE_BLAS": other}
    probe = subprocess.run([sys.executable, "-c", "from jsae.backends.cpu import kernels; print(kernels.blas_library())"],
                           env=env, capture_output=True, text=True, check=True)
    assert name in probe.stdout
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             "-k", "float64 or match_xla or non_finite"],
                            env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_default_blas_follows_the_cpu(monkeypatch):
    """Unset JSAE_BLAS: MKL on an Intel CPU (where installed), OpenBLAS on others (MKL's sgemm ran
    ~20% slower than OpenBLAS' on an AMD EPYC, bench/RESULTS.md); JSAE_BLAS overrides either way."""
    import glob
    import sys

    from jsae.backends.cpu import build

    if not glob.glob(f"{sys.prefix}/lib/libmkl_rt.so*"):
        pytest.skip("mkl is not installed here")
    monkeypatch.delenv("JSAE_BLAS", raising=False)
    for vendor, library in [("GenuineIntel", "libmkl_rt"), ("AuthenticAMD", "scipy_openblas"), ("", "scipy_openblas")]:
        monkeypatch.setattr(build, "cpu_vendor", lambda vendor=vendor: vendor)
        assert library in build._blas_library()[0], vendor
    monkeypatch.setattr(build, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setenv("JSAE_BLAS", "mkl")
    assert "libmkl_rt" in build._blas_library()[0]
    monkeypatch.setattr(build, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setenv("JSAE_BLAS", "openblas")
    assert "scipy_openblas" in build._blas_library()[0]


# ------------------------------------------------------------------ the fused Adam update
@pytest.mark.parametrize("arch,max_grad_norm", [("standard", 0.05), ("topk", 10.0), ("jumprelu", 0.05)])
def test_fused_adam_trains_as_optax(arch, max_grad_norm):
    """kernels.adam against optax's clip + Adam + apply_updates over six steps: the clip taken (a
    small max_grad_norm) and not, the same moments, count and parameters within float rounding."""
    from jsae.saes import TRAINING_ARCHITECTURES

    extra = {"topk": {"k": 8}}.get(arch, {})
    sae = TRAINING_ARCHITECTURES[arch].config_cls(d_in=D_IN, d_sae=256, **extra)
    states, metrics = [], []
    for implementation in ("optax", "auto"):
        cfg = jsae.TrainConfig(sae=sae, total_training_tokens=10**6, train_batch_size_tokens=128, lr=1e-3,
                               max_grad_norm=max_grad_norm, adam_implementation=implementation)
        state = jsae.init_train_state(cfg)
        assert (jsae.resolve_plan(cfg).optimizer == "fused_adam") == (implementation == "auto")
        step = jax.jit(jsae.make_train_step(cfg), donate_argnums=0)
        for i in range(6):
            state, m = step(state, jax.random.normal(jax.random.key(i), (128, D_IN)))
        states.append(state)
        metrics.append(m)
    optax_state, fused_state = states
    assert int(fused_state.opt_state[1].count) == int(optax_state.opt_state[1].count) == 6
    for tree in ("params",):
        for name, value in getattr(optax_state, tree).items():
            assert rel_err(getattr(fused_state, tree)[name], value) <= 1e-6, name
    for moment in ("mu", "nu"):
        for name, value in getattr(optax_state.opt_state[1], moment).items():
            assert rel_err(getattr(fused_state.opt_state[1], moment)[name], value) <= 1e-5, (moment, name)
    assert rel_err(metrics[1]["losses/overall_loss"], metrics[0]["losses/overall_loss"]) <= 1e-6


def test_fused_adam_is_not_taken_for_bfloat16_or_when_asked():
    sae = standard.StandardTrainingSAEConfig(d_in=8, d_sae=16, dtype="bfloat16")
    cfg = jsae.TrainConfig(sae=sae, total_training_tokens=10**4, train_batch_size_tokens=8)
    assert jsae.resolve_plan(cfg).optimizer == "optax"
    cfg = jsae.TrainConfig(sae=standard.StandardTrainingSAEConfig(d_in=8, d_sae=16), total_training_tokens=10**4,
                           train_batch_size_tokens=8, adam_implementation="optax")
    assert jsae.resolve_plan(cfg).optimizer == "optax"
    assert jsae.resolve_plan(cfg.replace(adam_implementation="auto")).optimizer == "fused_adam"
    assert jsae.resolve_plan(cfg.replace(adam_implementation="auto"), platform="gpu").optimizer == "optax"
    with pytest.raises(ConfigError, match="adam_implementation"):
        cfg.replace(adam_implementation="fused")


def test_adam_kernel_is_one_pass_of_optax_formulas():
    r = np.random.default_rng(0)
    p, g, m = (r.standard_normal(70_000).astype(np.float32) for _ in range(3))  # two chunks of 2^16
    v = np.abs(r.standard_normal(70_000)).astype(np.float32)
    for keep in (1.0, 0.0):
        c = np.array([keep, 3.0, 1.0, 0.1, 0.9, 0.001, 0.999, 1 - 0.9**3, 1 - 0.999**3, 1e-8, -1e-3], np.float32)
        got = jax.jit(kernels.adam)(p, g, m, v, c)
        gc = g if keep else (g / np.float32(3.0)) * np.float32(1.0)
        mu = np.float32(0.1) * gc + np.float32(0.9) * m
        nu = np.float32(0.001) * gc * gc + np.float32(0.999) * v
        step = (mu / c[7]) / (np.sqrt(nu / c[8]) + c[9])
        for value, want in zip(got, (p + c[10] * step, mu, nu), strict=True):
            np.testing.assert_allclose(value, want, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------ the product alone
@pytest.mark.parametrize("n,d,m", [(N, D_IN, D_SAE), (1, 3, 5), (7, 0, 4), (0, 5, 3)])
def test_matmul_matches_float64(n, d, m):
    """kernels.matmul against float64 numpy: row blocks with a tail (300 rows: 256 + 44), one row,
    an empty inner axis (zeros) and no rows."""
    r = np.random.default_rng(1)
    a = r.standard_normal((n, d)).astype(np.float32)
    b = r.standard_normal((d, m)).astype(np.float32)
    got = jax.jit(kernels.matmul)(a, b)
    assert got.shape == (n, m) and got.dtype == jnp.float32
    want = a.astype(np.float64) @ b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))


def test_matmul_under_vmap_and_bad_operands():
    r = np.random.default_rng(2)
    a = r.standard_normal((3, 40, 16)).astype(np.float32)
    b = r.standard_normal((3, 16, 24)).astype(np.float32)
    mapped = jax.jit(jax.vmap(kernels.matmul))(a, b)
    for i in range(3):
        np.testing.assert_array_equal(mapped[i], kernels.matmul(a[i], b[i]))  # each member on its own
    with pytest.raises(ValueError, match="matmul"):
        kernels.matmul(a[0], b[0, :-1])
    with pytest.raises(TypeError, match="float32"):
        kernels.matmul(a[0].astype(np.float16), b[0])


def test_sparse_topk_takes_its_encoder_product_from_the_blas():
    """The sparse TopK step's encoder product is kernels.matmul on CPU (float32), XLA's dot
    otherwise; tests/test_sparse_topk.py checks that the sparse and dense paths agree."""
    from jsae.saes import TRAINING_ARCHITECTURES

    sae = TRAINING_ARCHITECTURES["topk"].config_cls(d_in=D_IN, d_sae=D_SAE, k=8)
    cfg = jsae.TrainConfig(sae=sae, total_training_tokens=10**6, train_batch_size_tokens=N)
    plan = jsae.resolve_plan(cfg)
    assert plan.topk == "sparse" and plan.encoder_product == "blas"
    encoder_matmul = plan.ops().matmul
    state = jsae.init_train_state(cfg)
    text = jax.jit(jsae.make_train_step(cfg)).lower(state, jnp.zeros((N, D_IN))).as_text()
    assert "jsae_matmul_f32" in text
    x, W_enc = operands()[:2]
    assert "jsae_matmul_f32" not in jax.jit(encoder_matmul).lower(x.astype(np.float16), W_enc.astype(np.float16)).as_text()
