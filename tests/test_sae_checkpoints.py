"""n_checkpoints: SAELens folders during a run, at sae_lens' steps, written whole or not at all; the
wandb artifacts and histograms SAELens logs, read back from an offline run's .wandb file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import activation_batches

import jsae
from jsae.training.data import ArrayBatches
from jsae.training.sae_checkpoints import FOLDERS, checkpoint_steps

sae_lens = pytest.importorskip("sae_lens")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

D_IN, BATCH = 16, 64


def train_cfg(tmp_path, steps: int = 8, **changes) -> jsae.TrainConfig:
    data = {"sae": jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=32, k=4, metadata=jsae.Metadata(
                hook_name="blocks.1.hook_resid_pre", model_name="toy/model")),
            "total_training_tokens": steps * BATCH, "train_batch_size_tokens": BATCH, "lr": 1e-3,
            "checkpoint_path": str(tmp_path / "ckpt"), "output_path": str(tmp_path / "sae"), "progress_bar": False,
            "feature_sampling_window": 4, "dead_feature_window": 4, "n_batches_for_norm_estimate": 0} | changes
    return jsae.TrainConfig(**data)


def batches(steps: int = 8):
    return ArrayBatches(np.concatenate(activation_batches(steps, BATCH, D_IN)), BATCH, shuffle=False)


def saelens_checkpoint_names(tmp_path, total: int, batch: int, n: int) -> set[str]:
    """The folders sae_lens' own SAETrainer writes for n_checkpoints (a tiny SAE on random data)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    path = tmp_path / f"sl_{total}_{batch}_{n}"
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=4, d_sae=8, k=2))
    data = iter(torch.randn(batch, 4) for _ in range(10**6))
    cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=batch, n_checkpoints=n, lr_end=3e-5,
                           checkpoint_path=str(path), logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg=cfg, sae=sae, data_provider=data).fit()
    return {p.name for p in path.iterdir()} if path.exists() else set()


@pytest.mark.parametrize(("total", "batch", "n"), [(512, 64, 3), (1000, 100, 3), (1000, 100, 20), (640, 64, 1),
                                                   (300, 100, 5)])
def test_checkpoint_steps_are_sae_lens_own(tmp_path, total, batch, n):
    steps = checkpoint_steps(total, batch, total // batch, n)
    assert {str(tokens) for tokens in steps.values()} == saelens_checkpoint_names(tmp_path, total, batch, n)
    assert all(tokens == step * batch for step, tokens in steps.items())


@pytest.mark.slow
def test_three_checkpoints_leave_three_folders_sae_lens_loads(tmp_path):
    cfg = train_cfg(tmp_path, n_checkpoints=3)
    final = jsae.train(cfg, batches())
    steps = checkpoint_steps(cfg.total_training_tokens, BATCH, cfg.total_training_steps, 3)
    assert list(steps) == [3, 5, 7]  # thresholds 128, 256, 384 tokens: passed after steps 3, 5 and 7
    root = tmp_path / "ckpt" / FOLDERS
    assert sorted(p.name for p in root.iterdir()) == sorted(str(t) for t in steps.values())
    for tokens in steps.values():
        ref = sae_lens.SAE.load_from_disk(str(root / str(tokens)))
        ours = jsae.SAE.load_from_disk(root / str(tokens))
        np.testing.assert_array_equal(ref.W_dec.detach().numpy(), np.asarray(ours.params["W_dec"]))
        assert ref.cfg.metadata.hook_name == "blocks.1.hook_resid_pre" and ref.cfg.d_sae == 32
        assert (root / str(tokens) / "sparsity.safetensors").is_file()
    # the orbax state of each folder's step is there to resume from (keep_checkpoints: the newest 3)
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved == [5, 7, 8]
    # the folder of step 3 is the SAE a run of 3 steps saves (a constant learning rate: the same steps)
    short = jsae.train(train_cfg(tmp_path / "short", steps=3, checkpoint_path=None), batches(3))
    first = jsae.SAE.load_from_disk(root / str(steps[3]))
    for name, value in short.params.items():
        np.testing.assert_array_equal(np.asarray(first.params[name]), np.asarray(value), err_msg=name)
    assert not np.array_equal(np.asarray(first.params["W_dec"]), np.asarray(final.params["W_dec"]))


def test_a_checkpoint_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import jsae.io

    original, calls = jsae.io.write_safetensors, {"n": 0}

    def dying(path, tensors):
        calls["n"] += 1
        if calls["n"] == 3:  # the second folder's weights (each folder writes weights, then sparsity)
            raise KeyboardInterrupt
        return original(path, tensors)

    monkeypatch.setattr(jsae.io, "write_safetensors", dying)
    with pytest.raises(KeyboardInterrupt):
        jsae.train(train_cfg(tmp_path, n_checkpoints=3), batches())
    root = tmp_path / "ckpt" / FOLDERS
    assert [p.name for p in root.iterdir()] == [str(3 * BATCH)]  # no half-written folder, no temporary one
    sae_lens.SAE.load_from_disk(str(root / str(3 * BATCH)))


def test_n_checkpoints_needs_a_place(tmp_path):
    with pytest.raises(jsae.ConfigError, match="n_checkpoints=2 writes SAE folders under checkpoint_path"):
        train_cfg(tmp_path, n_checkpoints=2, checkpoint_path=None)
    with pytest.raises(jsae.ConfigError, match="n_checkpoints must be an integer >= 0"):
        train_cfg(tmp_path, n_checkpoints=-1)


# ------------------------------------------------------------------ wandb, offline
def wandb_records(run_dir: Path):
    """The records of an offline run's .wandb file: wandb's protobuf Records in the LevelDB log framing
    wandb writes them in (a 7-byte file header, then 32 KiB blocks of [crc32 u32, length u16, type u8] + data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first; middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_wandb_gets_sae_lens_artifacts_and_histograms(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_DATA_DIR": tmp_path / "data",
                        "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_CONFIG_DIR": tmp_path / "config",
                        "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, str(value))
    # no checkpoint_path: the folders go to wandb only, as in SAELens
    cfg = train_cfg(tmp_path, n_checkpoints=3, checkpoint_path=None, log_to_wandb=True, log_every_n_steps=2)
    sae = jsae.train(cfg, batches())
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = list(wandb_records(run_dir))
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    name = "sae_toy__model_blocks.1.hook_resid_pre_32"
    assert [(a.name, a.type) for a in artifacts] == [(name, "model"), (f"{name}_log_feature_sparsity",
                                                                        "log_feature_sparsity")] * 4
    files = [sorted(e.path for e in a.manifest.contents) for a in artifacts]
    assert files == [["cfg.json", "sae_weights.safetensors"], ["sparsity.safetensors"]] * 4
    assert "final_model" in artifacts[6].aliases and "final_model" not in artifacts[0].aliases
    assert json.loads(artifacts[0].metadata)["n_checkpoints"] == 3
    staged = {e.path: Path(e.local_path) for e in artifacts[6].manifest.contents}  # the final folder's files
    assert staged["sae_weights.safetensors"].read_bytes() == (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    windows = [step for step, items in sorted(history.items()) if "plots/feature_density_line_chart/_type" in items]
    assert windows == [4, 8]  # every feature_sampling_window steps
    last = history[8]
    assert last["plots/feature_density_line_chart/_type"] == "histogram"
    assert last["weights/W_dec_norms/_type"] == "histogram"
    assert sum(last["plots/feature_density_line_chart/values"]) == 32  # one value per latent
    # the last window is the saved SAE's sparsity.safetensors
    assert last["metrics/mean_log10_feature_sparsity"] == pytest.approx(float(np.mean(np.asarray(sae.sparsity))))
    assert last["sparsity/below_1e-5"] == int(np.sum(10.0 ** np.asarray(sae.sparsity, np.float64) - 1e-10 < 1e-5))
    assert "losses/overall_loss" in history[2]


def test_log_weights_to_wandb_false_sends_the_config_alone(tmp_path, monkeypatch):
    from jsae.training.sae_checkpoints import log_artifacts

    class Run:
        def __init__(self):
            self.logged = []

        def log_artifact(self, artifact, aliases=None):
            self.logged.append((artifact.name, sorted(artifact.manifest.entries), aliases))

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=4, d_sae=8, k=2, metadata=jsae.Metadata(
        hook_name="h", model_name="m")), seed=0)
    sae.save_model(tmp_path / "s")
    run = Run()
    log_artifacts(run, tmp_path / "s", sae, train_cfg(tmp_path, log_weights_to_wandb=False), aliases=["final_model"])
    assert run.logged == [("sae_m_h_8", ["cfg.json"], ["final_model"]), ("sae_m_h_8_log_feature_sparsity", [], None)]


@pytest.mark.slow
def test_a_sweep_writes_a_folder_per_member(tmp_path):
    from jsae.training.sae_checkpoints import artifact_name
    from jsae.training.sweep import Sweep, sweep_configs

    base = train_cfg(tmp_path, steps=4, n_checkpoints=1, output_path=None)
    members = sweep_configs(base, {"sae.k": [2, 4]})
    result = jsae.Trainer(base, sweep=Sweep(members, ["k=2", "k=4"])).fit(batches(4))
    folder = tmp_path / "ckpt" / FOLDERS / str(3 * BATCH)  # the threshold 128 is passed after step 3
    assert sorted(p.name for p in folder.iterdir()) == ["k=2", "k=4"]
    for name, k in (("k=2", 2), ("k=4", 4)):
        assert sae_lens.SAE.load_from_disk(str(folder / name)).cfg.k == k
    assert artifact_name(result["k=2"], "k=2") == "sae_toy__model_blocks.1.hook_resid_pre_32_k_2"
