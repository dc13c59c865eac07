"""jsae.enable_compilation_cache: a later process loads the training step from disk and trains the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Trains three steps of a sparse TopK SAE (the CPU kernels' FFI calls are in the program) and
# a dense standard one, and reports the cache folder, the cache hits and what was trained.
TRAIN = """
import hashlib, json, sys
import numpy as np
import jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
import jsae
folder = jsae.enable_compilation_cache(*sys.argv[1:])
out = {"folder": None if folder is None else str(folder)}
x = np.random.default_rng(0).standard_normal((3, 256, 64)).astype(np.float32)
for name, sae in [("topk", jsae.TopKTrainingSAEConfig(d_in=64, d_sae=2048, k=8, topk_implementation="sparse")),
                  ("standard", jsae.StandardTrainingSAEConfig(d_in=64, d_sae=1024, l1_coefficient=1.0))]:
    cfg = jsae.TrainConfig(sae=sae, total_training_tokens=768, train_batch_size_tokens=256, lr=1e-3)
    state = jsae.init_train_state(cfg)
    step = jax.jit(jsae.make_train_step(cfg), compiler_options=jsae.step_compiler_options())
    losses = []
    for batch in x:
        state, metrics = step(state, batch)
        losses.append(float(metrics["losses/overall_loss"]))
    params = jax.device_get(state.params)
    out[name] = {"losses": losses,
                 "params": {k: hashlib.sha256(np.asarray(v).tobytes()).hexdigest() for k, v in params.items()}}
out["hits"] = len(hits)
print(json.dumps(out))
"""


def _environment(**changes: str) -> dict[str, str]:
    """This process's environment without a JAX cache folder of the user's, with `changes`."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JSAE_COMPILATION_CACHE")}
    return env | changes


def _train(env: dict[str, str], *args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", TRAIN, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*-cache"))


def test_a_later_process_loads_the_steps_and_trains_the_same_numbers(tmp_path):
    folder = tmp_path / "xla"
    first = _train(_environment(), str(folder))
    assert first["folder"] == str(folder)
    written = _entries(folder)
    assert len(written) >= 2  # at least the two training steps
    assert first["hits"] == 0

    second = _train(_environment(), str(folder))
    assert second["hits"] >= 2  # both steps (and maybe more) came from disk
    assert _entries(folder) == written  # nothing compiled anew
    for name in ("topk", "standard"):
        assert second[name] == first[name]  # losses and parameters bit for bit


def test_the_default_folder_is_per_cpu_and_under_the_jsae_cache_folder(tmp_path, monkeypatch):
    from jsae.backends import compilation_cache as _compilation_cache
    from jsae.backends.cpu import kernels

    monkeypatch.setenv("JSAE_CACHE_DIR", str(tmp_path))
    here = _compilation_cache.default_cache_path()
    assert here.parent == tmp_path / "xla"
    assert _compilation_cache.default_cache_path() == here
    monkeypatch.setattr(kernels, "_cpu_fingerprint", lambda: "flags : fpu sse2 avx2")
    assert _compilation_cache.default_cache_path() != here


def test_off_where_the_user_says_so(tmp_path):
    # JSAE_COMPILATION_CACHE=0: nothing is cached.
    off = _train(_environment(JSAE_COMPILATION_CACHE="0"), str(tmp_path / "xla"))
    assert off["folder"] is None and not (tmp_path / "xla").exists()
    # JAX's own cache folder set by the user: jsae leaves it, and JAX caches there.
    own = tmp_path / "own"
    mine = _train(_environment(JAX_COMPILATION_CACHE_DIR=str(own)), str(tmp_path / "ignored"))
    assert mine["folder"] is None
    assert _entries(own) and not (tmp_path / "ignored").exists()


def test_a_folder_that_cannot_be_written_leaves_the_cache_off(tmp_path, monkeypatch):
    import jax
    import pytest

    import jsae

    if jax.config.jax_compilation_cache_dir:
        pytest.skip("JAX's cache folder is set in this environment (JAX_COMPILATION_CACHE_DIR)")
    monkeypatch.setenv("JSAE_COMPILATION_CACHE", "1")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="not kept on disk"):
        assert jsae.enable_compilation_cache(blocker / "xla") is None
    assert jax.config.jax_compilation_cache_dir is None  # JAX's settings untouched


def test_the_command_line_caches_in_the_jsae_cache_folder(tmp_path):
    # (without the CPU kernels, which would otherwise be built anew in this JSAE_CACHE_DIR)
    env = _environment(JSAE_CACHE_DIR=str(tmp_path), JSAE_HUGEPAGES="0", JSAE_CPU_KERNELS="0")
    run = subprocess.run([sys.executable, "-m", "bridge.cli", "demo", "--output-path", str(tmp_path / "demo")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "xla").is_dir()  # JAX opened its cache there at the first compile
