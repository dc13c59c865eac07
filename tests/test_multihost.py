"""Multi-host: 2 local processes x 2 devices (jax.distributed on 127.0.0.1) match 1 process x 4 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

D_IN, D_SAE, BATCH, STEPS = 16, 64, 64, 20


def make_batches():
    rng = np.random.default_rng(7)
    return [(rng.normal(size=(BATCH, D_IN)) + 0.2).astype(np.float32) for _ in range(STEPS)]


def make_cfg(**kw):
    import jsae

    return jsae.TrainConfig(
        sae=jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4), total_training_tokens=STEPS * BATCH,
        train_batch_size_tokens=BATCH, lr=3e-3, dead_feature_window=5, log_every_n_steps=5, progress_bar=False, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    import jax

    import jsae

    if jax.device_count() < 4:
        pytest.skip("needs 4 (forced host) devices for the reference run")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    worker = Path(__file__).with_name("multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    reference = jsae.Trainer(make_cfg(n_devices=4))
    ref_sae = reference.fit(iter(make_batches()))
    got = jsae.SAE.load_from_disk(tmp_path / "p0" / "sae")
    for name, value in ref_sae.params.items():
        a, b = np.asarray(got.params[name], np.float64), np.asarray(value, np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5, name
    # only process 0 wrote files
    assert not (tmp_path / "p1").exists()
    rows = [json.loads(line) for line in (tmp_path / "p0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "losses/overall_loss" in r] == [5, 10, 15, 20]
    assert rows[0]["jsae_execution"]["platform"] == "cpu"  # the plan is recorded first
