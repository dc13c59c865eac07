"""from_pretrained, offline, from a Hugging Face cache the tests populate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hub_cache import populate_hub_cache
from saelens_helpers import rel_err
from safetensors.numpy import save_file
from test_formats import gemma_scope_formula, gemma_scope_params, legacy_gpt2_cfg, random_weights

import jsae
from jsae import pretrained


def weights_file(tmp_path, weights, name="sae_weights.safetensors"):
    path = tmp_path / name
    save_file(weights, str(path))
    return path


@pytest.fixture(scope="module")
def gpt2_release(tmp_path_factory):
    """blocks.8.hook_resid_pre of gpt2-small-res-jb, in its legacy format, in the cache."""
    tmp = tmp_path_factory.mktemp("gpt2")
    w = random_weights(np.random.default_rng(10))
    sparsity = np.log10(np.random.default_rng(11).uniform(1e-5, 1e-1, size=128)).astype(np.float32)
    populate_hub_cache(
        "jbloom/GPT2-Small-SAEs-Reformatted",
        {
            "blocks.8.hook_resid_pre/cfg.json": json.dumps(legacy_gpt2_cfg()).encode(),
            "blocks.8.hook_resid_pre/sae_weights.safetensors": weights_file(tmp, w),
            "blocks.8.hook_resid_pre/sparsity.safetensors": weights_file(tmp, {"sparsity": sparsity}, "sp.safetensors"),
        },
    )
    return w, sparsity


def test_registry_release_offline(gpt2_release):
    w, sparsity = gpt2_release
    sae, cfg_dict, log_sparsity = jsae.SAE.from_pretrained_with_cfg_and_sparsity(
        "gpt2-small-res-jb", "blocks.8.hook_resid_pre"
    )
    np.testing.assert_array_equal(np.asarray(sae.W_enc), w["W_enc"])
    np.testing.assert_array_equal(np.asarray(log_sparsity), sparsity)
    assert cfg_dict["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    # the registry's config_overrides and neuronpedia id are applied
    assert sae.cfg.metadata.model_from_pretrained_kwargs == {"center_writing_weights": True}
    assert sae.cfg.metadata.neuronpedia_id == "gpt2-small/8-res-jb"
    x = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    acts = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    assert rel_err(jsae.SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre").encode(x), acts) <= 1e-5


def test_registry_release_matches_saelens_from_pretrained(gpt2_release):
    import sae_lens
    import torch

    ref = sae_lens.SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    sae = jsae.SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    x = np.random.default_rng(1).normal(size=(6, 32)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(sae(x), ref(torch.from_numpy(x)).numpy()) <= 1e-5
    assert sae.cfg.metadata.to_dict() == {k: v for k, v in ref.cfg.metadata.to_dict().items() if k in sae.cfg.metadata}


def test_owner_repo_id_directly(tmp_path):
    src = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=8, d_sae=32, k=4), seed=3)
    src.save_model(tmp_path / "folder")
    populate_hub_cache(
        "someone/my-saes",
        {
            "layer_3/cfg.json": tmp_path / "folder" / "cfg.json",
            "layer_3/sae_weights.safetensors": tmp_path / "folder" / "sae_weights.safetensors",
        },
    )
    sae = jsae.SAE.from_pretrained("someone/my-saes", "layer_3", dtype="bfloat16")
    assert sae.cfg.dtype == "bfloat16" and sae.cfg.k == 4
    np.testing.assert_array_equal(np.asarray(sae.W_dec), np.asarray(src.W_dec).astype(sae.W_dec.dtype))


def test_gemma_scope_release_via_registry(tmp_path):
    rel = pretrained.get_release("gemma-scope-2b-pt-res-canonical")
    if rel is None:
        pytest.skip("sae_lens registry not installed")
    sae_id = next(iter(rel.saes))
    folder = rel.saes[sae_id]["path"]
    p = gemma_scope_params(np.random.default_rng(12))
    np.savez(tmp_path / "params.npz", **p)
    populate_hub_cache(rel.repo_id, {f"{folder}/params.npz": tmp_path / "params.npz"})
    sae = jsae.SAE.from_pretrained("gemma-scope-2b-pt-res-canonical", sae_id)
    assert sae.cfg.architecture == "jumprelu"
    assert sae.cfg.metadata.model_name == "gemma-2-2b"
    x = np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32)
    assert rel_err(sae(x), gemma_scope_formula(p, x)[1]) <= 1e-5


def test_seed_alias_and_norm_scaling_factor(tmp_path):
    """The seed's `gemma-2b-res` resolves to gemma-2b-res-jb; its registry scaling factor is folded."""
    rel = pretrained.get_release("gemma-2b-res")
    assert rel.name == "gemma-2b-res-jb"
    info = rel.saes["blocks.12.hook_resid_post"]
    factor = info["norm_scaling_factor"]
    cfg = jsae.StandardSAEConfig(d_in=16, d_sae=64, normalize_activations="expected_average_only_in")
    src = jsae.SAE.from_config(cfg, seed=4)
    src.save_model(tmp_path / "f")
    populate_hub_cache(
        rel.repo_id,
        {
            f"{info['path']}/cfg.json": tmp_path / "f" / "cfg.json",
            f"{info['path']}/sae_weights.safetensors": tmp_path / "f" / "sae_weights.safetensors",
        },
    )
    sae, cfg_dict, sparsity = jsae.SAE.from_pretrained_with_cfg_and_sparsity(
        "gemma-2b-res", "blocks.12.hook_resid_post"
    )
    assert sparsity is None
    assert cfg_dict["normalize_activations"] == "none"
    np.testing.assert_allclose(np.asarray(sae.W_enc), np.asarray(src.W_enc) * factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sae.b_dec), np.asarray(src.b_dec) / factor, rtol=1e-6)


def test_unknown_release_lists_close_names():
    with pytest.raises(jsae.ConfigError, match=r"unknown release 'gpt2-small-res-jbb'.*gpt2-small-res-jb"):
        jsae.SAE.from_pretrained("gpt2-small-res-jbb", "blocks.8.hook_resid_pre")


def test_unknown_sae_id_lists_ids():
    with pytest.raises(jsae.ConfigError, match=r"blocks\.8\.hook_resid_pree.*blocks\.8\.hook_resid_pre"):
        jsae.SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pree")


def test_offline_and_not_cached_is_a_clear_error():
    with pytest.raises(jsae.MissingFileError, match="not in the local Hugging Face cache"):
        jsae.SAE.from_pretrained("gpt2-small-res-jb", "blocks.2.hook_resid_pre")


def test_builtin_registry_covers_seed_releases():
    reg = pretrained.builtin_registry()
    assert reg["gpt2-small-res-jb"].repo_id == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert "blocks.8.hook_resid_pre" in reg["gpt2-small-res-jb"].saes
    assert reg["gemma-2b-res-jb"].repo_id == "jbloom/Gemma-2b-Residual-Stream-SAEs"
