"""`jsae train` over several processes (jax.distributed on 127.0.0.1, one CPU device each): each process runs its
own model over its own data shard, process 0 alone writes, and the SAE equals one process training the same
data shards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jsae
from bridge.distributed import deal, launcher

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--set", "total_training_tokens=12288", "--set", "train_batch_size_tokens=1024", "--set", "sae.d_sae=256",
       "--set", "sae.k=8", "--set", "n_eval_batches=0", "--set", "n_batches_in_buffer=4",
       "--set", "store_batch_size_prompts=4", "--set", "checkpoint_path=null", "--set", "log_every_n_steps=4",
       "--set", "sae.normalize_activations=expected_average_only_in", "--set", "n_batches_for_norm_estimate=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsae_train(out: Path, *argv: str, devices: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "bridge.cli", "train", *RUN, "--output-path", str(out / "sae"),
                             "--set", f"log_path={out / 'metrics.jsonl'}", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_on_the_same_shards(tmp_path):
    port = free_port()
    procs = [jsae_train(tmp_path / f"p{i}", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", str(i), devices=1) for i in range(2)]
    outputs = [finish(p) for p in procs]
    one = finish(jsae_train(tmp_path / "one", "--set", "data_shards=2", devices=2))

    got = jsae.SAE.load_from_disk(tmp_path / "p0" / "sae")
    want = jsae.SAE.load_from_disk(tmp_path / "one" / "sae")
    for name, value in want.params.items():
        a, b = np.asarray(got.params[name], np.float64), np.asarray(value, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
    assert got.cfg.metadata["jsae_execution"] == want.cfg.metadata["jsae_execution"]
    # process 0 alone wrote the folder, the metrics and reported
    assert not (tmp_path / "p1").exists() and (tmp_path / "p0" / "metrics.jsonl").is_file()
    assert "SAE written to" in outputs[0] and "SAE written to" not in outputs[1] and "SAE written to" in one


def test_rows_are_dealt_round_robin_and_launchers_are_recognised():
    rows = list(range(10))
    assert [list(deal(rows, s, 3)) for s in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert launcher({}) is None and launcher({"SLURM_NTASKS": "1"}) is None
    assert launcher({"SLURM_NTASKS": "4"}) == "SLURM" and launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert launcher({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"


def test_incomplete_process_flags_are_refused(capsys):
    from bridge.cli import main

    assert main(["train", "--coordinator", "127.0.0.1:1", "--set", "total_training_tokens=40960"]) == 2
    assert "--coordinator, --num-processes and --process-id go together" in capsys.readouterr().err
