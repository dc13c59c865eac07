"""`jsae plan`: the trainer's execution plan, its mesh and each device's memory, without training."""

from __future__ import annotations

import json

import jax
import pytest

import jsae
from bridge.cli import main

SMALL = ["--set", "sae.d_sae=2048"]


def plan_json(capsys, *argv):
    rc = main(["plan", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


def test_plan_reports_the_trainers_plan_and_memory(capsys):
    rc, report = plan_json(capsys, *SMALL, "--set", "n_devices=1")
    assert rc == 0 and report["fits"]
    memory = report["per_device_bytes"]
    assert set(memory) == {"params_and_optimizer", "step_temporaries", "activation_buffer", "model_weights", "total"}
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    weights = (128 * 2048 * 2 + 2048 + 128) * 4  # W_enc, W_dec, b_enc, b_dec in float32
    assert 3 * weights <= memory["params_and_optimizer"] < 3 * weights + 2048 * 4 * 4  # + Adam's two moments, counters
    assert memory["step_temporaries"] > 4096 * 2048 * 4  # at least one (tokens, d_sae) float32 array
    assert memory["activation_buffer"] == 16 * 32 * 128 * 128 * 4  # the default config's shuffle buffer
    assert report["mesh"] == {"data": 1} and report["plan"]["platform"] == "cpu"
    _, half = plan_json(capsys, *SMALL, "--set", "n_devices=1", "--set", "activations_dtype=bfloat16")
    assert half["per_device_bytes"]["activation_buffer"] == memory["activation_buffer"] // 2


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced host) devices")
def test_split_latents_hold_a_share_of_the_state_on_each_device(capsys):
    _, whole = plan_json(capsys, *SMALL, "--set", "n_devices=8")
    _, split = plan_json(capsys, *SMALL, "--set", "n_devices=8", "--set", "model_axis_size=4")
    assert split["mesh"] == {"data": 2, "model": 4}
    assert split["plan"]["optimizer"] == "optax"  # XLA partitions the update of split latents
    assert split["per_device_bytes"]["params_and_optimizer"] < 0.3 * whole["per_device_bytes"]["params_and_optimizer"]


def test_a_run_that_cannot_fit_exits_1_with_suggestions(capsys):
    rc = main(["plan", "--set", "sae.d_sae=4194304", "--set", "n_devices=1"])
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out and "try train_batch_size_tokens: 2048" in out
    assert out.splitlines()[0].startswith("plan: cpu: topk sparse")


def test_a_step_larger_than_the_device_is_refused_with_its_figures(monkeypatch):
    from jsae import backends
    from jsae.training.memory import refuse_if_too_large

    monkeypatch.setattr(backends, "device_memory_bytes", lambda device: 3 << 30)
    device = jax.devices()[0]
    refuse_if_too_large({"params_and_optimizer": 1 << 30, "step_temporaries": 1 << 30}, device)  # fits
    with pytest.raises(jsae.ConfigError, match=r"one training step needs 4.00 GiB on each device \(params_and_"
                                               r"optimizer 1.00 GiB, step_temporaries 3.00 GiB\) and a cpu device "
                                               r"holds 3.00 GiB"):
        refuse_if_too_large({"params_and_optimizer": 1 << 30, "step_temporaries": 3 << 30}, device)


def test_another_platform_is_planned_here_against_its_memory(capsys):
    """`--platform gpu` compiles the step a GPU runs (XLA's primitives, no CPU kernels) and checks it against
    `--device-memory-gib`; the suggestions name the accelerator's remedies."""
    rc, report = plan_json(capsys, *SMALL, "--set", "n_devices=1", "--platform", "gpu", "--device-memory-gib", "80")
    assert rc == 0 and report["fits"] and report["device_bytes"] == 80 << 30
    assert report["plan"]["platform"] == "gpu" and report["plan"]["topk"] == "dense" and report["plan"]["top_k"] == "xla"
    rc = main(["plan", "--set", "sae.d_sae=1048576", "--set", "n_devices=1", "--platform", "gpu",
               "--device-memory-gib", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out and "try act_store_device: cpu" in out
