"""The execution plan: resolved once, recorded with the run, and a plan for another platform runs here
with the same numbers; nothing outside jsae/backends checks the platform or touches the CPU kernels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import activation_batches, relative

import jsae

ROOT = Path(__file__).resolve().parents[1]
# What only the back-end package may do: ask JAX for the platform, read a JSAE_* variable, use the CPU kernels.
PLATFORM_CHECKS = re.compile(r"default_backend\(|environ[^\n]*[\"']JSAE_|getenv\([\"']JSAE_|jsae\.kernels|"
                             r"jsae\.backends\.cpu|from jsae\.backends import [^\n]*\bcpu\b")


def test_no_platform_checks_outside_the_back_end_package():
    offenders = []
    for path in sorted([*ROOT.glob("jsae/**/*.py"), *ROOT.glob("bridge/**/*.py")]):
        if path.relative_to(ROOT).parts[:2] == ("jsae", "backends"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PLATFORM_CHECKS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_check_finds_what_it_looks_for():
    for line in ('platform = jax.default_backend()', 'os.environ.get("JSAE_BLAS")', "from jsae.backends.cpu import kernels",
                 "from jsae.backends import cpu"):
        assert PLATFORM_CHECKS.search(line), line
    assert not PLATFORM_CHECKS.search("from jsae.backends import resolve_plan")


CONFIGS = {
    # the default run's SAE: sparse TopK on the CPU plan, dense on the GPU plan
    "topk": jsae.TopKTrainingSAEConfig(d_in=128, d_sae=1024, k=32),
    "standard": jsae.StandardTrainingSAEConfig(d_in=32, d_sae=256, l1_coefficient=0.5),
    "jumprelu": jsae.JumpReLUTrainingSAEConfig(d_in=32, d_sae=256, l0_coefficient=0.05),
}


def train(cfg, plan, batches):
    step = jax.jit(jsae.make_train_step(cfg, plan=plan), compiler_options=plan.jit_compiler_options)
    state = jsae.init_train_state(cfg)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["losses/overall_loss"]))
    return state, np.array(losses)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_gpu_plan_runs_on_cpu_with_the_cpu_plans_losses(arch):
    sae = CONFIGS[arch]
    cfg = jsae.TrainConfig(sae=sae, total_training_tokens=10 * 256, train_batch_size_tokens=256, lr=1e-3,
                           dead_feature_window=3, progress_bar=False)
    cpu_plan, gpu_plan = jsae.resolve_plan(cfg), jsae.resolve_plan(cfg, platform="gpu")
    assert gpu_plan.platform == "gpu" and gpu_plan.top_k == "xla" and gpu_plan.optimizer == "optax"
    assert gpu_plan.ops() == jsae.backends.REFERENCE.replace(sparse_topk=gpu_plan.topk == "sparse")
    if arch == "topk":
        assert cpu_plan.topk == "sparse" and gpu_plan.topk == "dense"
    else:
        assert gpu_plan.dense_step == "xla"
    batches = activation_batches(10, 256, sae.d_in, seed=3)
    cpu_state, cpu_losses = train(cfg, cpu_plan, batches)
    gpu_state, gpu_losses = train(cfg, gpu_plan, batches)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5, atol=1e-6)
    for name, value in cpu_state.params.items():
        assert relative(gpu_state.params[name], value) <= 1e-5, name


def test_the_plan_is_recorded_in_cfg_json_and_metrics(tmp_path):
    cfg = jsae.TrainConfig(sae=CONFIGS["topk"], total_training_tokens=4 * 256, train_batch_size_tokens=256,
                           output_path=str(tmp_path / "sae"), log_every_n_steps=2, progress_bar=False, n_devices=1)
    trainer = jsae.Trainer(cfg)
    trainer.fit(iter(activation_batches(4, 256, 128)))
    recorded = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["jsae_execution"]
    assert recorded == trainer.plan.to_dict() == jsae.resolve_plan(cfg, devices=trainer.devices).to_dict()
    assert recorded["platform"] == "cpu" and recorded["topk"] in ("sparse", "dense")
    first = json.loads((tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["jsae_execution"] == recorded and first["step"] == 0
    line = trainer.plan.describe()
    assert "\n" not in line and line.startswith("cpu: ") and f"topk {recorded['topk']}" in line


def test_another_platform_gets_no_cpu_kernels_and_vmapped_sweeps():
    cfg = jsae.TrainConfig(sae=CONFIGS["standard"], total_training_tokens=256, train_batch_size_tokens=256)
    plan = jsae.resolve_plan(cfg, platform="gpu", n_members=4)
    assert (plan.sweep, plan.dense_step, plan.blas, plan.compiler_options) == ("vmap", "xla", None, ())
    with pytest.raises(ValueError, match="platform must be one of"):
        jsae.resolve_plan(cfg, platform="quantum")
