"""bench/gpu_checks.py, the script a GPU machine runs, runs its checks on CPU devices too (--allow-cpu) and fails
loudly: exit 1 and a FAIL line when a check fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_checks(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_checks.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_checks_pass_on_cpu_devices():
    run = gpu_checks("--allow-cpu", "--steps", "5", "--only", "dlpack,train,bf16,sparse")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("PASS ") == 4 and "4 of 4 checks passed" in run.stdout


def test_without_a_gpu_the_script_fails_unless_allowed():
    run = gpu_checks("--only", "dlpack")
    assert run.returncode == 1 and "FAIL: JAX's backend is cpu, not a GPU" in run.stdout
