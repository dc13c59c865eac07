"""Checks of jsae on a GPU: each prints PASS or FAIL with its figures; the exit status is 1 if any failed.

    python bench/gpu_checks.py              # on a machine with CUDA (JAX's cuda12 build and torch's CUDA build)
    python bench/gpu_checks.py --allow-cpu  # the same checks on CPU devices (what the test suite runs)

Checks:
- dlpack: torch -> JAX -> torch without a copy, float32 and bfloat16, on cuda:0 and, where there are
  two GPUs, on cuda:1 while cuda:0 is torch's current device.
- train: TopK and JumpReLU, 50 steps on the GPU equal 50 steps on the CPU (float32 products at full
  precision on both), relative parameter difference <= 1e-3.
- bf16: compute_dtype bfloat16 trains the same TopK SAE to within 0.01 explained variance of float32.
- sparse: TopK training on the sparse path equals the dense path on the GPU (parameters 1e-3 after 50
  steps of Adam, which amplifies float rounding in near-zero gradients).
- jsae_train: `jsae train` end to end on a small budget, the model on the GPU (device: auto), writes
  a folder whose cfg.json records the GPU plan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS, TOKENS = 50, 1024


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def batches(d_in: int, n: int = STEPS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4 * d_in, d_in)).astype(np.float32)
    out = []
    for _ in range(n):
        codes = rng.random((TOKENS, 4 * d_in)) * (rng.random((TOKENS, 4 * d_in)) < 0.02)
        out.append((codes @ basis).astype(np.float32))
    return out


def train_on(devices, cfg, data):
    import jsae

    return jsae.Trainer(cfg, devices=devices).fit(iter(data))


def config(arch: str, **kw):
    import jsae

    sae = {"topk": lambda: jsae.TopKTrainingSAEConfig(d_in=256, d_sae=2048, k=32,
                                                      topk_implementation=kw.pop("topk", "auto")),
           "jumprelu": lambda: jsae.JumpReLUTrainingSAEConfig(d_in=256, d_sae=2048, l0_coefficient=1.0)}[arch]()
    return jsae.TrainConfig(sae=sae, total_training_tokens=STEPS * TOKENS, train_batch_size_tokens=TOKENS, lr=1e-3,
                            progress_bar=False, n_devices=1, matmul_precision=kw.pop("precision", "float32"), **kw)


def explained_variance(sae, data) -> float:
    from jsae.evals import ExplainedVarianceStats

    stats = ExplainedVarianceStats()
    for x in data[-5:]:
        stats.update(x, np.asarray(sae(x)))
    return stats.result()["explained_variance"]


# ---------------------------------------------------------------------- the checks
def check_dlpack(gpus) -> str:
    import torch

    from bridge.dlpack import jax_to_torch, torch_to_jax

    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else []) if gpus else ["cpu"]
    lines = []
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            with torch.cuda.device(0) if gpus else _nothing():  # cuda:1's tensor while cuda:0 is current
                t = torch.randn(512, 256, device=device).to(dtype)
                x = torch_to_jax(t)
                back = jax_to_torch(x)
            assert x.unsafe_buffer_pointer() == t.data_ptr(), f"{device} {dtype}: torch -> JAX copied"
            assert back.data_ptr() == t.data_ptr(), f"{device} {dtype}: JAX -> torch copied"
            assert torch.equal(back, t) and str(back.device) == str(t.device)
            lines.append(f"{device} {str(dtype).removeprefix('torch.')}")
    return "zero copy both ways: " + ", ".join(lines) + ("" if len(devices) > 1 or not gpus else
                                                        " (one GPU: cuda:1 not checked)")


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def check_train(device, cpu) -> str:
    out = []
    for arch in ("topk", "jumprelu"):
        data = batches(256)
        on_device, on_cpu = train_on([device], config(arch), data), train_on([cpu], config(arch), data)
        worst = max(relative(on_device.params[k], on_cpu.params[k]) for k in on_cpu.params)
        assert worst <= 1e-3, f"{arch}: {STEPS} steps differ from the CPU by {worst:.2e} (relative)"
        out.append(f"{arch} {worst:.1e}")
    return f"{STEPS} steps vs CPU, worst relative parameter difference: " + ", ".join(out)


def check_bf16(device) -> str:
    data = batches(256, seed=1)
    f32 = explained_variance(train_on([device], config("topk"), data), data)
    bf16 = explained_variance(train_on([device], config("topk", compute_dtype="bfloat16"), data), data)
    assert abs(f32 - bf16) <= 0.01, f"explained variance float32 {f32:.4f} vs bfloat16 compute {bf16:.4f}"
    return f"explained variance float32 {f32:.4f}, bfloat16 compute {bf16:.4f}"


def check_sparse(device) -> str:
    data = batches(256, seed=2)
    dense = train_on([device], config("topk", topk="dense"), data)
    sparse = train_on([device], config("topk", topk="sparse"), data)
    worst = max(relative(sparse.params[k], dense.params[k]) for k in dense.params)
    assert worst <= 1e-3, f"sparse vs dense TopK after {STEPS} steps: {worst:.2e}"
    return f"sparse vs dense TopK, {STEPS} steps: worst relative parameter difference {worst:.1e}"


def check_jsae_train(gpus) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sae"
        cmd = [sys.executable, "-m", "bridge.cli", "train", "--output-path", str(out),
               "--set", "total_training_tokens=204800", "--set", "n_eval_batches=2", "--set", "checkpoint_path=null",
               "--set", f"log_path={Path(tmp) / 'metrics.jsonl'}"]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        cfg = json.loads((out / "cfg.json").read_text())
        plan = cfg["metadata"]["jsae_execution"]
        want = "gpu" if gpus else "cpu"
        assert plan["platform"] == want, f"the run's plan is {plan['platform']}, not {want}"
        assert "CE loss score" in run.stdout, run.stdout[-2000:]
        score = run.stdout.split("CE loss score")[1].split()[0]
        return f"jsae train: plan {plan['platform']}, CE loss score {score}"


def main() -> int:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU devices when JAX sees no GPU")
    parser.add_argument("--only", default=None, help="comma-separated checks to run (default: all)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps of each check (default {STEPS})")
    args = parser.parse_args()
    STEPS = args.steps
    import jax

    gpus = jax.default_backend() == "gpu"
    if not gpus and not args.allow_cpu:
        print(f"FAIL: JAX's backend is {jax.default_backend()}, not a GPU (install the cuda12 extra; "
              "--allow-cpu runs the checks on CPU devices)")
        return 1
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    print(f"devices: {jax.devices()}", flush=True)
    checks = {"dlpack": lambda: check_dlpack(gpus), "train": lambda: check_train(device, cpu),
              "bf16": lambda: check_bf16(device), "sparse": lambda: check_sparse(device),
              "jsae_train": lambda: check_jsae_train(gpus)}
    chosen = args.only.split(",") if args.only else list(checks)
    failed = []
    for name in chosen:
        t = time.perf_counter()
        try:
            message = checks[name]()
            print(f"PASS {name} ({time.perf_counter() - t:.0f} s): {message}", flush=True)
        except Exception as err:  # noqa: BLE001 - every check reports, then the exit status says
            failed.append(name)
            detail = str(err) if isinstance(err, AssertionError) else traceback.format_exc(limit=3)
            print(f"FAIL {name} ({time.perf_counter() - t:.0f} s): {detail}", flush=True)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
