"""Feature sharding: a (data 2 x model 4) mesh, latents split over `model`, trains the same SAE as one device."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import activation_batches, relative

import jsae
from jsae.io import read_safetensors

N_DEV, MODEL, D_IN, D_SAE, BATCH, STEPS = 8, 4, 16, 64, 64, 24

CONFIGS = {
    "standard": jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=1.0),
    "topk": jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
    "batchtopk": jsae.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
}

needs_8 = pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 8 (forced host) devices")


def make_batches(seed=0):
    return activation_batches(STEPS, BATCH, D_IN, seed)


def train_cfg(sae_cfg, **kw):
    # dead_feature_window=5: latents die within the run, so the aux-k losses take part
    kw = dict(total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, lr=3e-3, dead_feature_window=5,
              log_every_n_steps=6, progress_bar=False) | kw
    return jsae.TrainConfig(sae=sae_cfg, **kw)



def assert_close_states(got, want, tol=1e-5):
    for name, ref in want.params.items():
        assert relative(got.params[name], ref) <= tol, name
    np.testing.assert_array_equal(np.asarray(got.steps_since_fired), np.asarray(want.steps_since_fired))
    np.testing.assert_array_equal(np.asarray(got.act_freq), np.asarray(want.act_freq))
    assert int(got.step) == int(want.step)


@needs_8
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_sharded_training_matches_one_device(arch, tmp_path):
    cfg = train_cfg(CONFIGS[arch])
    data = make_batches()
    single = jsae.Trainer(cfg.replace(n_devices=1, output_path=str(tmp_path / "single")))
    single.fit(iter(data))
    sharded = jsae.Trainer(cfg.replace(model_axis_size=MODEL, output_path=str(tmp_path / "sharded")))
    assert dict(sharded.mesh.shape) == {"data": N_DEV // MODEL, "model": MODEL}
    if hasattr(cfg.sae, "dense_implementation"):
        # split latents keep XLA's products (which XLA partitions); one device may take the dense kernels
        assert sharded.plan.dense_step == "xla" and sharded.plan.optimizer == "optax"
        assert single.plan.dense_step == "cpu_fused" and single.plan.optimizer == "fused_adam"
        assert sharded.cfg.sae.dense_implementation == cfg.sae.dense_implementation  # the config is not rewritten
    sharded.fit(iter(data))

    assert_close_states(sharded.state, single.state)
    # the state stayed sharded between steps: latents over `model` (parameters, their Adam moments and the
    # per-latent counters), everything else replicated
    latent = {"W_enc": P(None, "model"), "W_dec": P("model", None), "b_enc": P("model"),
              "steps_since_fired": P("model"), "act_freq": P("model")}
    seen = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded.state):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        assert leaf.sharding.spec == latent.get(name, P()), jax.tree_util.keystr(path)
        seen.append(name)
    assert seen.count("W_enc") == seen.count("W_dec") == 3  # parameter, Adam mu and nu

    # the saved folders are the same format, and hold the same SAE
    want_cfg = json.loads((tmp_path / "single" / "cfg.json").read_text())
    got_cfg = json.loads((tmp_path / "sharded" / "cfg.json").read_text())
    assert got_cfg.keys() == want_cfg.keys() and got_cfg["metadata"].keys() == want_cfg["metadata"].keys()
    assert {k: v for k, v in got_cfg.items() if k != "metadata"} == {k: v for k, v in want_cfg.items()
                                                                      if k != "metadata"}
    for filename in ("sae_weights.safetensors", "sparsity.safetensors"):
        want, got = read_safetensors(tmp_path / "single" / filename), read_safetensors(tmp_path / "sharded" / filename)
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
        for name in want:
            assert relative(got[name], want[name]) <= 1e-5, (filename, name)


@needs_8
def test_sharded_resume_equals_uninterrupted(tmp_path):
    cfg = train_cfg(CONFIGS["topk"], model_axis_size=MODEL, checkpoint_every_n_steps=5)
    data = make_batches(1)
    uninterrupted = jsae.Trainer(cfg)
    uninterrupted.fit(iter(data))

    ckpt = tmp_path / "ckpt"
    with pytest.raises(jsae.InputError, match="data ran out at step 12"):
        jsae.Trainer(cfg.replace(checkpoint_path=str(ckpt))).fit(iter(data[:12]))  # checkpoints at 5 and 10
    shutil.copytree(ckpt, tmp_path / "ckpt_copy")

    resumed = jsae.Trainer(cfg.replace(checkpoint_path=str(ckpt)))
    resumed.fit(iter(data))
    assert resumed.state.params["W_enc"].sharding.spec == P(None, "model")
    for name, ref in uninterrupted.state.params.items():
        np.testing.assert_array_equal(np.asarray(resumed.state.params[name]), np.asarray(ref), err_msg=name)
    assert_close_states(resumed.state, uninterrupted.state, tol=0)

    # the sharded checkpoint also resumes on a data-parallel mesh (orbax reshards it)
    other = jsae.Trainer(cfg.replace(checkpoint_path=str(tmp_path / "ckpt_copy"), model_axis_size=1))
    other.fit(iter(data))
    assert_close_states(other.state, uninterrupted.state)


@needs_8
def test_bad_layouts_name_the_field():
    sae = jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    with pytest.raises(jsae.ConfigError, match=r"model_axis_size=3 does not divide d_sae=64"):
        train_cfg(sae, model_axis_size=3)
    with pytest.raises(jsae.ConfigError, match=r"model_axis_size must be a positive integer, got 0"):
        train_cfg(sae, model_axis_size=0)
    with pytest.raises(jsae.ConfigError, match=r"model_axis_size=4 does not divide n_devices=6"):
        train_cfg(sae, model_axis_size=4, n_devices=6)
    with pytest.raises(jsae.ConfigError, match=r"model_axis_size=16 does not divide the 8 device\(s\).*larger than"):
        jsae.Trainer(train_cfg(sae, model_axis_size=16))
    with pytest.raises(jsae.ConfigError, match=r"model_axis_size=4 does not divide the 6 device\(s\)"):
        jsae.Trainer(train_cfg(sae, model_axis_size=4), devices=jax.devices()[:6])
    with pytest.raises(jsae.ConfigError, match=r"train_batch_size_tokens=66 is not divisible by the data axis size 4 "
                                               r"\(8 devices / model_axis_size=2\)"):
        jsae.Trainer(train_cfg(sae, model_axis_size=2, train_batch_size_tokens=66))


@pytest.mark.slow
@needs_8
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 devices on a (data 2 x model 4) mesh, each process one data row."""
    from test_multihost import STEPS as MH_STEPS
    from test_multihost import free_port, make_batches, make_cfg

    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    worker = Path(__file__).with_name("multihost_worker.py")
    ckpt = str(tmp_path / "ckpt")
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", port, str(tmp_path), "4", str(MODEL), ckpt],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    reference = jsae.Trainer(make_cfg(model_axis_size=MODEL))
    ref_sae = reference.fit(iter(make_batches()))
    got = jsae.SAE.load_from_disk(tmp_path / "p0" / "sae")
    assert got.params.keys() == ref_sae.params.keys()
    for name, value in ref_sae.params.items():
        assert got.params[name].shape == value.shape and got.params[name].dtype == value.dtype
        assert relative(got.params[name], value) <= 1e-5, name
    assert not (tmp_path / "p1").exists()  # only process 0 wrote the SAE and the metrics

    # the checkpoint both processes wrote restores in one process
    restored = jsae.Trainer(make_cfg(model_axis_size=MODEL, checkpoint_path=ckpt))
    restored.fit(iter(make_batches()))
    assert int(restored.state.step) == MH_STEPS
    assert_close_states(restored.state, reference.state)


@needs_8
def test_sharded_top_k_equals_lax_top_k():
    """Each shard's top k, then the top k of the candidates: lax.top_k's values and indices, ties included
    (lower index first), with the mesh (shard_map) and without it (the same two stages on a view)."""
    from jax.sharding import Mesh, NamedSharding

    from jsae.backends.sharded import latent_mesh, sharded_top_k

    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, size=(16, 64)).astype(np.float32)  # many ties, across shards too
    want_values, want_indices = jax.lax.top_k(x, 8)
    mesh = Mesh(np.array(jax.devices()[:N_DEV]).reshape(2, MODEL), ("data", "model"))

    def under_mesh(a):
        with latent_mesh(mesh):
            return sharded_top_k(a, 8, shards=MODEL)

    sharded = jax.jit(under_mesh, in_shardings=NamedSharding(mesh, P("data", "model")))
    hlo = sharded.lower(x).compile().as_text()
    assert "all-gather" in hlo and not re.search(r"= f32\[\d+,64\]\S* all-gather\(", hlo)  # candidates cross, rows don't
    for values, indices in (sharded(x), jax.jit(lambda a: sharded_top_k(a, 8, shards=MODEL))(x)):
        np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
        np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))


@needs_8
def test_split_latents_cut_step_temporaries_on_the_gpu_plan():
    """TopK 4096 -> 131072 at 8192 tokens, the step a GPU runs (compiled here from abstract shapes, nothing
    allocated): split over 8 devices, each device's step temporaries are at most a quarter of one device's
    (each shard takes its own top-k; only k candidates per shard cross devices)."""
    def temporaries(model_axis_size):
        cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=4096, d_sae=131072, k=64),
                               train_batch_size_tokens=8192, total_training_tokens=8192 * 100,
                               model_axis_size=model_axis_size, n_devices=model_axis_size)
        trainer = jsae.Trainer(cfg, check_memory=False, platform="gpu")
        assert trainer.plan.latent_shards == model_axis_size and trainer.plan.topk == "dense"
        return trainer.step_memory()["step_temporaries"]

    one, split = temporaries(1), temporaries(N_DEV)
    assert split <= one / 4, (split / 2**30, one / 2**30)
