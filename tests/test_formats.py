"""Legacy SAELens folders, EleutherAI sparsify folders and Gemma Scope params.npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
from saelens_helpers import rel_err
from safetensors.numpy import save_file

import jsae

D_IN, D_SAE = 32, 128


def legacy_gpt2_cfg(d_in=D_IN, d_sae=D_SAE, hook="blocks.8.hook_resid_pre"):
    """The key set of the gpt2-small-res-jb cfg.json on the Hub (pre-6.0 SAELens), with small widths."""
    return {
        "model_name": "gpt2-small",
        "hook_point": hook,
        "hook_point_layer": 8,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": 128,
        "use_cached_activations": False,
        "cached_activations_path": None,
        "d_in": d_in,
        "n_batches_in_buffer": 128,
        "total_training_tokens": 300000000,
        "store_batch_size": 32,
        "device": "mps",
        "seed": 42,
        "dtype": "torch.float32",
        "b_dec_init_method": "geometric_median",
        "expansion_factor": d_sae // d_in,
        "from_pretrained_path": None,
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "lr_scheduler_name": None,
        "lr_warm_up_steps": 5000,
        "train_batch_size": 4096,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "feature_sampling_method": None,
        "resample_batches": 1028,
        "feature_reinit_scale": 0.2,
        "dead_feature_window": 5000,
        "dead_feature_estimation_method": "no_re_init",
        "dead_feature_threshold": 1e-08,
        "log_to_wandb": True,
        "wandb_project": "mats_sae_training_gpt2_small_resid_pre_5",
        "wandb_entity": None,
        "wandb_log_frequency": 100,
        "n_checkpoints": 10,
        "checkpoint_path": "checkpoints/y1t51byy",
        "d_sae": d_sae,
        "tokens_per_buffer": 67108864,
        "run_name": f"{d_sae}-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }


def random_weights(rng, d_in=D_IN, d_sae=D_SAE):
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(size=(d_sae,)).astype(np.float32) * 0.3,
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_dec": rng.normal(size=(d_in,)).astype(np.float32),
    }


def write_legacy_folder(path, weights, cfg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(path / "sae_weights.safetensors"))


def test_legacy_gpt2_folder_loads_and_matches_formula_and_saelens(tmp_path):
    rng = np.random.default_rng(0)
    w = random_weights(rng)
    write_legacy_folder(tmp_path, w | {"scaling_factor": np.ones(D_SAE, np.float32)}, legacy_gpt2_cfg())
    sae = jsae.SAE.load_from_disk(tmp_path)
    assert sae.cfg.architecture == "standard"
    assert sae.cfg.dtype == "float32"
    assert sae.cfg.metadata.hook_name == "blocks.8.hook_resid_pre"
    assert sae.cfg.metadata.model_name == "gpt2-small"
    assert sae.cfg.metadata.context_size == 128
    assert set(sae.params) == {"W_enc", "b_enc", "W_dec", "b_dec"}  # all-ones scaling_factor dropped
    x = rng.normal(size=(20, D_IN)).astype(np.float32)
    acts = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    assert rel_err(sae.encode(x), acts) <= 1e-5
    assert rel_err(sae(x), acts @ w["W_dec"] + w["b_dec"]) <= 1e-5

    import sae_lens
    import torch

    ref = sae_lens.SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        assert rel_err(sae(x), ref(torch.from_numpy(x)).numpy()) <= 1e-5
    assert sae.cfg.metadata.hook_name == ref.cfg.metadata.hook_name


def test_legacy_topk_and_normalize_bool(tmp_path):
    rng = np.random.default_rng(1)
    cfg = legacy_gpt2_cfg() | {
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
        "normalize_activations": True,
    }
    write_legacy_folder(tmp_path, random_weights(rng), cfg)
    sae = jsae.SAE.load_from_disk(tmp_path)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 5
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    x = rng.normal(size=(10, D_IN)).astype(np.float32)
    assert (np.asarray(sae.encode(x)) > 0).sum(-1).max() <= 5


def test_legacy_log_threshold_becomes_threshold(tmp_path):
    rng = np.random.default_rng(2)
    w = random_weights(rng)
    log_threshold = rng.normal(size=(D_SAE,)).astype(np.float32) * 0.5 - 1
    cfg = legacy_gpt2_cfg() | {"architecture": "jumprelu", "sae_lens_version": "5.3.0"}
    write_legacy_folder(tmp_path, w | {"log_threshold": log_threshold}, cfg)
    sae = jsae.SAE.load_from_disk(tmp_path)
    np.testing.assert_allclose(np.asarray(sae.params["threshold"]), np.exp(log_threshold), rtol=1e-6)
    x = rng.normal(size=(10, D_IN)).astype(np.float32)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert rel_err(sae.encode(x), np.where(pre > np.exp(log_threshold), np.maximum(pre, 0), 0)) <= 1e-5


def sparsify_folder(path, rng, d_in=D_IN, n_latents=D_SAE, k=8):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": n_latents,
                "k": k,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": d_in,
            }
        )
    )
    w = {
        "encoder.weight": rng.normal(size=(n_latents, d_in)).astype(np.float32),
        "encoder.bias": rng.normal(size=(n_latents,)).astype(np.float32) * 0.1,
        "W_dec": rng.normal(size=(n_latents, d_in)).astype(np.float32),
        "b_dec": rng.normal(size=(d_in,)).astype(np.float32),
    }
    save_file(w, str(path / "sae.safetensors"))
    return w


def sparsify_formula(w, x, k):
    """sparsify's SparseCoder: topk(relu((x - b_dec) @ enc.T + b)), decoded as sum_i a_i W_dec[i] + b_dec."""
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=-1)[:, :k]
    top = np.take_along_axis(pre, idx, -1)
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, idx, top, -1)
    recon = np.einsum("nk,nkd->nd", top, w["W_dec"][idx]) + w["b_dec"]
    return acts, recon


def test_sparsify_folder(tmp_path):
    rng = np.random.default_rng(3)
    w = sparsify_folder(tmp_path / "layers.6", rng)
    sae = jsae.SAE.load_from_disk(tmp_path / "layers.6")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 8
    assert sae.cfg.metadata.hook_name == "blocks.6.hook_resid_post"
    x = rng.normal(size=(24, D_IN)).astype(np.float32)
    acts, recon = sparsify_formula(w, x, 8)
    assert rel_err(sae.encode(x), acts) <= 1e-5
    assert rel_err(sae(x), recon) <= 1e-5
    # and it can be handed to SAELens as an ordinary folder
    sae.save_model(tmp_path / "as_saelens")
    assert json.loads((tmp_path / "as_saelens" / "cfg.json").read_text())["architecture"] == "topk"


def gemma_scope_params(rng, d_in=D_IN, d_sae=D_SAE):
    return {
        "w_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "w_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=(d_sae,)).astype(np.float32),
        "b_dec": rng.normal(size=(d_in,)).astype(np.float32),
        "threshold": np.abs(rng.normal(size=(d_sae,))).astype(np.float32),
    }


def gemma_scope_formula(p, x):
    pre = x @ p["w_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    return acts, acts @ p["w_dec"] + p["b_dec"]


def test_gemma_scope_params_npz(tmp_path):
    rng = np.random.default_rng(4)
    p = gemma_scope_params(rng)
    np.savez(tmp_path / "params.npz", **p)
    sae = jsae.SAE.load_from_disk(tmp_path)
    assert sae.cfg.architecture == "jumprelu"
    assert sae.cfg.apply_b_dec_to_input is False
    x = rng.normal(size=(16, D_IN)).astype(np.float32)
    acts, recon = gemma_scope_formula(p, x)
    assert rel_err(sae.encode(x), acts) <= 1e-5
    assert rel_err(sae(x), recon) <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "torch.float16"])
def test_load_with_dtype_override(tmp_path, dtype):
    write_legacy_folder(tmp_path, random_weights(np.random.default_rng(5)), legacy_gpt2_cfg())
    sae = jsae.SAE.load_from_disk(tmp_path, dtype=dtype)
    expected = dtype.replace("torch.", "")
    assert sae.cfg.dtype == expected
    assert all(str(v.dtype) == expected for v in sae.params.values())
