"""The trained SAE is saved exactly as SAELens saves its inference model, and sae_lens opens it."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from saelens_helpers import rel_err, to_numpy
from test_training_losses import make_pair

import jsae


@pytest.mark.parametrize("case", ["standard", "gated", "jumprelu_step", "topk", "topk_no_rescale", "batchtopk",
                                  "matryoshka"])
@pytest.mark.parametrize("scaled", [False, True])
def test_inference_save_matches_saelens(tmp_path, case, scaled):
    import sae_lens

    ref, sae_cfg, params, arch = make_pair(case)
    if scaled:
        sae_cfg = sae_cfg.replace(normalize_activations="expected_average_only_in")
        ref.cfg.normalize_activations = "expected_average_only_in"
    cfg = jsae.TrainConfig(sae=sae_cfg, total_training_tokens=64, train_batch_size_tokens=64, n_devices=1)
    trainer = jsae.Trainer(cfg)
    state = trainer.init_state(params=params, scaling_factor=1.7 if scaled else 1.0)
    if "threshold" in state.extra:  # BatchTopK's running threshold
        ref.topk_threshold = torch.tensor(0.123456789012345, dtype=torch.float64)
        pair = jnp.array([0.12345679, 0.123456789012345 - 0.12345679], jnp.float32)
        state = state.replace(extra=state.extra | {"threshold": pair})
    if scaled:
        ref.fold_activation_norm_scaling_factor(1.7)
    ref.save_inference_model(tmp_path / "ref")

    sae = trainer.inference_sae(state)
    sae.save_model(tmp_path / "jsae")
    want = sae_lens.SAE.load_from_disk(str(tmp_path / "ref"))
    got = sae_lens.SAE.load_from_disk(str(tmp_path / "jsae"))
    assert type(got) is type(want)
    assert got.cfg.architecture() == want.cfg.architecture()
    for name, tensor in want.state_dict().items():
        assert rel_err(to_numpy(got.state_dict()[name]), to_numpy(tensor)) <= 1e-6, name
    got_cfg = json.loads((tmp_path / "jsae" / "cfg.json").read_text())
    want_cfg = json.loads((tmp_path / "ref" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "normalize_activations", "apply_b_dec_to_input"):
        assert got_cfg[key] == want_cfg[key], key
    assert got_cfg["metadata"]["training_architecture"] == want_cfg["metadata"]["training_architecture"]
    details = want_cfg["metadata"]["training_architecture_details"]
    assert {k: got_cfg["metadata"]["training_architecture_details"][k] for k in details} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in details.items()}
    x = torch.randn(16, 16)
    with torch.no_grad():
        assert rel_err(sae(x.numpy()), got(x).numpy()) <= 1e-5


def test_trained_folder_has_sparsity_and_metadata(tmp_path):
    import sae_lens

    rng = np.random.default_rng(0)
    cfg = jsae.TrainConfig(sae=jsae.BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4.0),
                           total_training_tokens=30 * 64, train_batch_size_tokens=64, lr=3e-3,
                           dead_feature_window=10, output_path=str(tmp_path / "sae"), progress_bar=False, n_devices=1)
    sae = jsae.train(cfg, (rng.normal(size=(64, 16)).astype(np.float32) for _ in range(30)))
    ref = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    assert ref.cfg.architecture() == "jumprelu"
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["training_architecture"] == "batchtopk"
    assert 0 < meta["l0"] <= 64 and isinstance(meta["num_dead_features"], int)
    assert (tmp_path / "sae" / "sparsity.safetensors").exists()
    assert float(sae.params["threshold"][0]) > 0
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json", "metrics.jsonl", "sae_weights.safetensors", "sparsity.safetensors"]
