"""Nothing is lost on a crash: SIGKILL / SIGTERM at any step, then resume, gives the uninterrupted result."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("train_worker.py")


def run(out_dir, kill_at=-1, sig="SIGKILL", after_loop=""):
    return subprocess.run([sys.executable, str(WORKER), str(out_dir), str(kill_at), sig, after_loop],
                          capture_output=True, text=True, timeout=300)


def tensors(folder):
    from jsae.io import read_safetensors

    return read_safetensors(Path(folder) / "sae_weights.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_run(out, reference):
    want, got = tensors(reference / "sae"), tensors(out / "sae")
    assert set(want) == set(got)
    for name in want:
        assert np.array_equal(got[name], want[name]), f"{name} differs after resume"
    want_cfg = json.loads((reference / "sae" / "cfg.json").read_text())
    assert json.loads((out / "sae" / "cfg.json").read_text()) == want_cfg


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, reference):
    kill_at = random.Random().randint(6, 37)  # a batch index past the 3 norm-estimate batches
    killed = run(tmp_path, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "sae" / "cfg.json").exists()  # no half-trained SAE folder to load by mistake
    resumed = run(tmp_path)
    assert resumed.returncode == 0, f"kill_at={kill_at}\n" + resumed.stderr[-3000:]
    assert_same_run(tmp_path, reference)
    lines = (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 40


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path, reference):
    stopped = run(tmp_path, 17, "SIGTERM")
    assert stopped.returncode != 0 and "TrainingInterrupted" in stopped.stderr
    steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert steps[-1] == 18  # checkpointed right after the interrupted step (batches consumed)
    assert run(tmp_path).returncode == 0
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
@pytest.mark.parametrize("after_loop, message", [("eval", "final evaluation stopped by a signal"),
                                                 ("save", "stopped by signal 15 while saving")])
def test_sigterm_after_the_loop_saves_the_sae_and_says_so(tmp_path, reference, after_loop, message):
    """SIGTERM in the final evaluation, or while the SAE is written: the finished SAE is saved whole and
    the run stops with a message, never silently by SIGTERM's default action."""
    stopped = run(tmp_path, sig="SIGTERM", after_loop=after_loop)
    assert stopped.returncode == 1 and "TrainingInterrupted" in stopped.stderr and message in stderr_of(stopped)
    assert_same_run(tmp_path, reference)  # every step ran: the weights and cfg.json are the uninterrupted run's


def stderr_of(result):
    return " ".join(result.stderr.split())


@pytest.mark.slow
def test_a_checkpoint_half_written_when_killed_is_ignored(tmp_path, reference):
    killed = run(tmp_path, 21)
    assert killed.returncode == -9
    ckpt = tmp_path / "ckpt"
    latest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    # what a kill in the middle of orbax's write leaves: a temporary folder with partial files
    partial = ckpt / f"{latest + 3}.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpt / str(latest), partial)
    for f in partial.rglob("*"):
        if f.is_file() and f.stat().st_size > 16:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    resumed = run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, reference)


def test_sigterm_stops_a_cli_command_with_a_message():
    """Outside the training loop (which checkpoints first), SIGTERM stops a `jsae` command as Ctrl-C
    does: a message and exit status 130, then SIGTERM's own handler is back."""
    code = "\n".join([
        "import os, signal, sys",
        "import bridge.cli as cli",
        "cli.demo = lambda args: os.kill(os.getpid(), signal.SIGTERM) or 0",
        "status = cli.main(['demo'])",
        "print(status, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["130", "True"]
    assert "jsae demo: stopped by a signal" in result.stderr
