"""Sweeps: every SAE of a vmapped sweep equals training it alone with the same seed and batches."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from train_helpers import activation_batches, relative

import jsae
from jsae.training.sweep import init_sweep_state, make_sweep_step, member_state, sweep_configs

D_IN, D_SAE, BATCH, STEPS = 16, 64, 128, 30


def make_batches(seed=0):
    return activation_batches(STEPS, BATCH, D_IN, seed)



def base_cfg(sae_cfg, **kw):
    kw = dict(total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, lr=3e-3, dead_feature_window=8,
              lr_scheduler_name="cosineannealing", lr_warm_up_steps=3, progress_bar=False) | kw
    return jsae.TrainConfig(sae=sae_cfg, **kw)


SWEEPS = {
    "standard": (jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=1.0, l1_warm_up_steps=5),
                 {"sae.l1_coefficient": [0.3, 1.0, 3.0, 10.0], "lr": [1e-3, 3e-3, 3e-3, 1e-2], "seed": [0, 1, 2, 3]}),
    "jumprelu": (jsae.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.3, jumprelu_bandwidth=0.2),
                 {"sae.l0_coefficient": [0.1, 0.3, 1.0, 3.0], "seed": [5, 6, 7, 8]}),
}


@pytest.mark.parametrize("strategy", ["vmap", "unroll", "map"])
@pytest.mark.parametrize("arch", list(SWEEPS))
def test_each_sweep_member_equals_training_it_alone(arch, strategy):
    sae_cfg, axes = SWEEPS[arch]
    members = sweep_configs(base_cfg(sae_cfg), axes)
    assert len(members) == 4
    data = make_batches()

    step = jax.jit(make_sweep_step(members, strategy=strategy))
    states = init_sweep_state(members)
    for batch in data:
        states, metrics = step(states, batch)
    assert metrics["losses/overall_loss"].shape == (4,)

    for i, member in enumerate(members):
        alone_step = jax.jit(jsae.make_train_step(member))
        alone = jsae.init_train_state(member)
        for batch in data:
            alone, alone_metrics = alone_step(alone, batch)
        swept = member_state(states, i)
        for name, value in alone.params.items():
            assert relative(swept.params[name], value) <= 1e-5, (i, name)
        np.testing.assert_array_equal(np.asarray(swept.steps_since_fired), np.asarray(alone.steps_since_fired))
        assert float(metrics["details/current_learning_rate"][i]) == pytest.approx(
            float(alone_metrics["details/current_learning_rate"]), rel=1e-6)
    # the members really differ
    assert relative(member_state(states, 0).params["W_enc"], member_state(states, 3).params["W_enc"]) > 0.1


@pytest.mark.parametrize(("axes", "message"), [
    ({"sae.l1_coefficient": [1, 2, 3], "lr": [1e-3, 3e-3]}, "sae.l1_coefficient has 3, lr has 2 values"),
    ({"sae.d_sae": [64, 128]}, "'sae.d_sae' cannot be swept"),
    ({"sae.k": [4, 8]}, "unknown field 'sae.k' for a standard SAE"),
    ({"l1_coefficient": [1, 2]}, "unknown field 'l1_coefficient'"),
    ({"lr": []}, "sweep.lr: expected a non-empty list"),
    ({"sae.l1_coefficient": [1.0, -1.0]}, "member 1 (l1_coefficient=-1.0)"),
])
def test_bad_sweeps_are_clear_errors(axes, message):
    base = base_cfg(jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(jsae.ConfigError) as err:
        sweep_configs(base, axes)
    assert message in str(err.value)


def test_members_that_differ_in_shape_are_refused():
    a = base_cfg(jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    b = base_cfg(jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=2 * D_SAE))
    with pytest.raises(jsae.ConfigError, match="member 1 differs from member 0"):
        make_sweep_step([a, b])


@pytest.mark.parametrize("n_devices", [1, 4])
def test_trainer_sweep_saves_each_member_like_a_separate_run(tmp_path, n_devices):
    from jsae.training.sweep import Sweep

    if jax.device_count() < n_devices:
        pytest.skip("needs forced host devices")
    sae_cfg, axes = SWEEPS["standard"]
    base = base_cfg(sae_cfg, n_devices=n_devices, output_path=str(tmp_path / "sweep"), log_every_n_steps=10)
    members = sweep_configs(base, axes)
    names = [f"m{i}" for i in range(4)]
    data = make_batches()
    saes = jsae.Trainer(base, sweep=Sweep(members, names)).fit(iter(data))
    assert len(saes) == 4
    for i, member in enumerate(members):
        alone = jsae.Trainer(member.replace(output_path=None)).fit(iter(data))
        saved = jsae.SAE.load_from_disk(tmp_path / "sweep" / names[i])
        for name, value in alone.params.items():
            assert relative(saved.params[name], value) <= 1e-5, (i, name)
        assert saved.cfg.metadata.l0 == pytest.approx(alone.cfg.metadata.l0, rel=1e-5)
        assert saved.cfg.metadata.training_architecture_details["l1_coefficient"] == axes["sae.l1_coefficient"][i]
    import json

    rows = [json.loads(line) for line in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "jsae_execution" not in r]  # the plan's record leads the file
    assert [r["step"] for r in rows] == [10, 20, 30] and "m3/losses/overall_loss" in rows[0]


@pytest.mark.parametrize("strategy", ["vmap", "unroll", "map"])
def test_members_reading_different_streams_equal_separate_runs(strategy):
    from jsae.training.sweep import Sweep

    sae_cfg, _ = SWEEPS["standard"]
    base = base_cfg(sae_cfg, sweep_strategy=strategy)
    streams = [make_batches(0), make_batches(1)]
    members = sweep_configs(base, {"seed": [3, 4]}) * 2
    sweep = Sweep(members, ["a/s3", "a/s4", "b/s3", "b/s4"], streams=[0, 0, 1, 1])
    stacked = [np.stack([a, b]) for a, b in zip(*streams, strict=True)]
    saes = jsae.Trainer(base, sweep=sweep).fit(iter(stacked))
    for sae, member, stream in zip(saes, members, sweep.streams, strict=True):
        alone = jsae.Trainer(member).fit(iter(streams[stream]))
        for name, value in alone.params.items():
            assert relative(sae.params[name], value) <= 1e-5, (stream, member.seed, name)
    assert relative(saes[0].params["W_enc"], saes[2].params["W_enc"]) > 0.01  # the streams differ


@pytest.mark.parametrize("strategy", ["vmap", "unroll", "map"])
def test_a_sweep_over_k_equals_training_each_k_alone(strategy):
    base = base_cfg(jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, topk_implementation="dense"))
    members = sweep_configs(base, {"sae.k": [2, 4, 8, 3], "seed": [0, 1, 2, 3]})
    data = make_batches()
    step = jax.jit(make_sweep_step(members, strategy=strategy))
    states = init_sweep_state(members)
    for batch in data:
        states, metrics = step(states, batch)
    np.testing.assert_allclose(np.asarray(metrics["metrics/l0"]), [2, 4, 8, 3], atol=0.05)
    for i, member in enumerate(members):
        for implementation in ("dense", "sparse"):  # each k alone, on both TopK paths
            alone_cfg = member.replace(sae=member.sae.replace(topk_implementation=implementation))
            alone_step = jax.jit(jsae.make_train_step(alone_cfg))
            alone = jsae.init_train_state(alone_cfg)
            for batch in data:
                alone, _ = alone_step(alone, batch)
            for name, value in alone.params.items():
                assert relative(member_state(states, i).params[name], value) <= 1e-5, (i, implementation, name)


def test_auto_strategy():
    from jsae.backends import UNROLL_MAX_MEMBERS, resolve_strategy

    assert resolve_strategy("auto", 8, "cpu", cpu_kernels=True) == "map"
    assert resolve_strategy("auto", 8, "cpu", cpu_kernels=False) == "unroll"
    assert resolve_strategy("auto", UNROLL_MAX_MEMBERS + 1, "cpu", cpu_kernels=False) == "map"
    assert resolve_strategy("auto", 8, "gpu", cpu_kernels=False) == "vmap"
    assert resolve_strategy("map", 8, "gpu") == "map"
    with pytest.raises(jsae.ConfigError, match="sweep_strategy must be 'auto', 'vmap', 'unroll' or 'map'"):
        base_cfg(SWEEPS["standard"][0], sweep_strategy="scan")
