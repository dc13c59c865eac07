"""Each SAELens conversion func jsae implements, on a miniature of a real release in the Hub cache.

Files are written as the release stores them (real repo ids, paths, file names and config
fields; tiny widths, random weights) and `jsae.SAE.from_pretrained` is compared with
`sae_lens.SAE.from_pretrained` on the same cache: every tensor bit for bit, the config fields that
matter, and encode / decode / forward. Where SAELens hard-codes a released SAE's width
(deepseek_r1, qwen_scope) or asks the Hub for tensor shapes over HTTP (gemma_3), the test shrinks
that one table entry or answers from the cached file.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from hub_cache import populate_hub_cache
from pretrained_helpers import answer_tensor_shapes_from_cache, assert_matches_saelens, bits, path_of, rand
from safetensors.numpy import save_file

import jsae
from jsae import releases

sae_lens = pytest.importorskip("sae_lens")
loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")

def torch_bytes(tmp_path, state, name="w.pt"):
    path = tmp_path / name
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in state.items()}, path)
    return path


def st_bytes(tmp_path, state, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


def put(release, files):
    """Write `files` (path in repo -> bytes, dict (JSON) or local file) into the release's repo."""
    repo_id = releases.get_release(release).repo_id
    populate_hub_cache(repo_id, {k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in files.items()})


def test_connor_rob_hook_z(tmp_path):
    release, sae_id = "gpt2-small-hook-z-kk", "blocks.0.hook_z"
    rng = np.random.default_rng(0)
    path = path_of(release, sae_id)
    state = {"W_enc": rand(rng, 8, 24), "W_dec": rand(rng, 24, 8), "b_enc": rand(rng, 24) * 0.1, "b_dec": rand(rng, 8)}
    put(release, {path: torch_bytes(tmp_path, state),
                  path.split(".pt")[0] + "_cfg.json": {"act_size": 8, "dict_size": 24, "act_name": "blocks.0.attn.hook_z",
                                                      "l1_coeff": 1.8, "lr": 1.2e-3}})
    sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(5, 2, 4)).astype(np.float32))
    assert sae.cfg.reshape_activations == "hook_z" and sae.cfg.metadata.neuronpedia_id == "gpt2-small/0-att-kk"


DICTIONARY_LEARNING = {  # dict_class -> (release, sae_id, state dict in dictionary_learning's names)
    "AutoEncoder": ("sae_bench_pythia70m_sweep_standard_ctx128_0712", "blocks.3.hook_resid_post__trainer_10"),
    "GatedAutoEncoder": ("sae_bench_pythia70m_sweep_gated_ctx128_0730", "blocks.3.hook_resid_post__trainer_0"),
    "AutoEncoderTopK": ("sae_bench_pythia70m_sweep_topk_ctx128_0730", "blocks.3.hook_resid_post__trainer_0"),
    "MatryoshkaBatchTopKSAE": ("saebench_gemma-2-2b_width-2pow14_date-0107", "blocks.12.hook_resid_post__trainer_0"),
    "JumpReluAutoEncoder": ("llama-3.1-8b-instruct-andyrdt", "resid_post_layer_3_trainer_1"),
}


def dictionary_learning_state(dict_class, rng, d_in=8, d_sae=32):
    linear = {"encoder.weight": rand(rng, d_sae, d_in), "decoder.weight": rand(rng, d_in, d_sae)}
    if dict_class == "AutoEncoder":
        return linear | {"encoder.bias": rand(rng, d_sae) * 0.1, "bias": rand(rng, d_in)}
    if dict_class == "GatedAutoEncoder":
        return linear | {"decoder_bias": rand(rng, d_in), "mag_bias": rand(rng, d_sae) * 0.1,
                         "gate_bias": rand(rng, d_sae) * 0.1, "r_mag": rand(rng, d_sae) * 0.2}
    if dict_class == "AutoEncoderTopK":
        return linear | {"encoder.bias": rand(rng, d_sae) * 0.1, "b_dec": rand(rng, d_in),
                         "threshold": torch.tensor(0.05), "k": torch.tensor(4)}
    sae_style = {"W_enc": rand(rng, d_in, d_sae), "W_dec": rand(rng, d_sae, d_in), "b_enc": rand(rng, d_sae) * 0.1,
                 "b_dec": rand(rng, d_in)}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return sae_style | {"threshold": torch.tensor(0.11), "k": torch.tensor(4),
                            "group_sizes": torch.tensor([8, 24])}
    return sae_style | {"threshold": np.abs(rand(rng, d_sae))}


@pytest.mark.parametrize("dict_class", list(DICTIONARY_LEARNING))
def test_dictionary_learning_1(tmp_path, dict_class):
    release, sae_id = DICTIONARY_LEARNING[dict_class]
    rng = np.random.default_rng(1)
    path = path_of(release, sae_id)
    trainer = {"dict_class": dict_class, "layer": 3, "activation_dim": 8, "dict_size": 32,
               "lm_name": "EleutherAI/pythia-70m-deduped", "k": 4, "lr": 3e-4}
    put(release, {f"{path}/config.json": {"trainer": trainer, "buffer": {"ctx_len": 128, "d_submodule": 8}},
                  f"{path}/ae.pt": torch_bytes(tmp_path, dictionary_learning_state(dict_class, rng))})
    sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(6, 8)).astype(np.float32))
    expected = {"AutoEncoderTopK": "topk", "GatedAutoEncoder": "gated", "AutoEncoder": "standard"}
    assert sae.cfg.architecture == expected.get(dict_class, "jumprelu")


def test_deepseek_r1(tmp_path, monkeypatch):
    release, sae_id = "deepseek-r1-distill-llama-8b-qresearch", "blocks.19.hook_resid_post"
    rng = np.random.default_rng(2)
    real = loaders.get_deepseek_r1_config_from_hf
    # SAELens hard-codes the released width (4096 x 65536); the miniature is 8 x 32
    monkeypatch.setattr(loaders, "get_deepseek_r1_config_from_hf", lambda *a, **k: real(*a, **k) | {"d_in": 8, "d_sae": 32})
    bf16 = {"encoder.weight": rand(rng, 32, 8), "encoder.bias": rand(rng, 32) * 0.1,
            "decoder.weight": rand(rng, 8, 32), "decoder.bias": rand(rng, 8)}
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in bf16.items()}  # released in bfloat16
    put(release, {path_of(release, sae_id): torch_bytes(tmp_path, state)})
    for dtype in ("float32", "bfloat16"):
        sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(6, 8)).astype(np.float32), dtype=dtype)
    assert sae.cfg.metadata.hook_name == "blocks.19.hook_resid_post" and not sae.cfg.apply_b_dec_to_input


def test_qwen_scope(tmp_path, monkeypatch):
    release, sae_id = "qwen-scope-3-1.7b-base-w32k-l50", "layer0"
    rng = np.random.default_rng(3)
    # SAELens takes d_in from a per-model table (2048 here); the miniature reads 8-wide activations
    monkeypatch.setitem(loaders.QWEN_SCOPE_MODEL_INFO, "Qwen3-1.7B-Base", ("Qwen/Qwen3-1.7B-Base", 8))
    d_sae = 32 * 1024  # the width in the repo name
    state = {"W_enc": rand(rng, d_sae, 8), "W_dec": rand(rng, 8, d_sae), "b_enc": rand(rng, d_sae) * 0.1,
             "b_dec": rand(rng, 8)}
    put(release, {path_of(release, sae_id): torch_bytes(tmp_path, state)})
    sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(4, 8)).astype(np.float32))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 50 and sae.cfg.metadata.hf_hook_name == "model.layers.0"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_scope(tmp_path, dtype):
    release, sae_id = "llama_scope_lxr_8x", "l0r_8x"
    rng = np.random.default_rng(4)
    path = path_of(release, sae_id)
    hyper = {"d_model": 8, "d_sae": 32, "hook_point_in": "blocks.0.hook_resid_post", "hook_point_out":
             "blocks.0.hook_resid_post", "jump_relu_threshold": 0.0123, "dataset_average_activation_norm":
             {"in": 1.7, "out": 1.7}, "norm_activation": "dataset-wise"}
    state = {"encoder.weight": rand(rng, 32, 8), "encoder.bias": rand(rng, 32) * 0.01,
             "decoder.weight": rand(rng, 8, 32), "decoder.bias": rand(rng, 8)}
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}  # released in bfloat16
    put(release, {f"{path}/hyperparams.json": hyper,
                  f"{path}/checkpoints/final.safetensors": st_bytes(tmp_path, state)})
    x = rng.normal(size=(6, 8)).astype(np.float32) * 0.05  # threshold ~ 0.0123 * s / nsf after folding
    sae, _ = assert_matches_saelens(release, sae_id, x, dtype=dtype)
    assert sae.cfg.normalize_activations == "none"  # the registry's norm_scaling_factor is folded


def test_llama_scope_r1_distill(tmp_path):
    release, sae_id = "llama_scope_r1_distill", "l0r_800m_slimpajama"
    rng = np.random.default_rng(5)
    path = path_of(release, sae_id)
    state = {"encoder.weight": rand(rng, 32, 8), "encoder.bias": rand(rng, 32) * 0.01,
             "decoder.weight": rand(rng, 8, 32), "decoder.bias": rand(rng, 8),
             "log_jumprelu_threshold": rand(rng, 32) - 4.0}
    put(release, {f"{path}/config.json": {"d_model": 8, "expansion_factor": 4, "hook_point_in": "blocks.0.hook_resid_post",
                                          "sae_type": "sae", "act_fn": "jumprelu"},
                  f"{path}/sae_weights.safetensors": st_bytes(tmp_path, state)})
    x = rng.normal(size=(6, 8)).astype(np.float32) * 0.02
    sae, _ = assert_matches_saelens(release, sae_id, x, rounded=("threshold",))
    np.testing.assert_allclose(np.asarray(sae.params["threshold"]), np.exp(state["log_jumprelu_threshold"].astype(np.float64)),
                               rtol=1e-7)
    assert sae.cfg.metadata.model_name == "meta-llama/Llama-3.1-8B"


@pytest.fixture
def gemma_3_shapes_offline(monkeypatch):
    """SAELens asks the Hub for Gemma Scope 2 tensor shapes over HTTP; answer from the cached file."""
    answer_tensor_shapes_from_cache(monkeypatch)


GEMMA_3 = {  # variant -> (release, sae_id, config.json or None (SAELens infers it), d_out or None, affine)
    "res": ("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_big",
            {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": "model.layers.12.output",
             "l0": 150, "width": 16384}, None, False),
    "att_inferred": ("gemma-scope-2-270m-pt-att", "layer_12_width_16k_l0_big", None, None, False),
    "mlp": ("gemma-scope-2-4b-it-mlp", "layer_17_width_16k_l0_big",
            {"architecture": "jump_relu", "model_name": "google/gemma-3-4b-it",
             "hf_hook_point_in": "model.layers.17.post_feedforward_layernorm.output"}, None, False),
    "transcoder": ("gemma-scope-2-270m-it-transcoders", "transcoder/layer_12_width_16k_l0_big",
                   {"architecture": "jump_relu", "model_name": "gemma-v3-270m-it", "affine_connection": False,
                    "hf_hook_point_in": "model.layers.12.pre_feedforward_layernorm.output",
                    "hf_hook_point_out": "model.layers.12.post_feedforward_layernorm.output"}, 6, False),
    "transcoder_affine_inferred": ("gemma-scope-2-270m-pt-transcoders", "transcoder/layer_15_width_262k_l0_big_affine",
                                   None, 6, True),
}


@pytest.mark.parametrize("variant", list(GEMMA_3))
def test_gemma_3(tmp_path, gemma_3_shapes_offline, variant):
    release, sae_id, config, d_out, affine = GEMMA_3[variant]
    rng = np.random.default_rng(6)
    path = path_of(release, sae_id)
    d_in, d_sae = 8, 32
    tensors = {"w_enc": rand(rng, d_in, d_sae), "w_dec": rand(rng, d_sae, d_out or d_in), "b_enc": rand(rng, d_sae) * 0.1,
               "b_dec": rand(rng, d_out or d_in), "threshold": np.abs(rand(rng, d_sae)) * 0.3}
    if affine:
        tensors["affine_skip_connection"] = rand(rng, d_in, d_out)
    files = {f"{path}/params.safetensors": st_bytes(tmp_path, tensors)}
    if config is not None:
        files[f"{path}/config.json"] = config
    put(release, files)
    sae, ref = assert_matches_saelens(release, sae_id, rng.normal(size=(6, d_in)).astype(np.float32))
    if d_out is not None:
        assert sae.cfg.d_out == d_out and sae.cfg.metadata.hook_name_out == ref.cfg.metadata.hook_name_out
        assert sae.cfg.architecture == ("jumprelu_skip_transcoder" if affine else "jumprelu_transcoder")


def test_gemma_3_other_architecture_is_a_clear_error(tmp_path):
    release, sae_id = "gemma-scope-2-270m-pt-mlp", "layer_12_width_16k_l0_big"
    path = path_of(release, sae_id)
    put(release, {f"{path}/config.json": {"architecture": "topk", "model_name": "gemma-v3-270m-pt"}})
    with pytest.raises(jsae.ConfigError, match=r"gemma-scope-2-270m-pt-mlp.*'topk'.*jump_relu"):
        jsae.SAE.from_pretrained(release, sae_id)


@pytest.mark.parametrize("release,sae_id", [("gemma-scope-2b-pt-att", "layer_0/width_16k/average_l0_104"),
                                            ("gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6")])
def test_gemma_2(tmp_path, monkeypatch, release, sae_id):
    """Gemma Scope: attention SAEs read hook_z (flattened heads); embedding SAEs are rescaled by sqrt(d_in)."""
    rng = np.random.default_rng(7)
    real = loaders.get_gemma_2_config_from_hf
    # SAELens takes the widths from tables (d_in per model, d_sae from 'width_16k'); the miniature is 8 x 32
    monkeypatch.setattr(loaders, "get_gemma_2_config_from_hf", lambda *a, **k: real(*a, **k) | {"d_in": 8, "d_sae": 32})
    p = {"w_enc": rand(rng, 8, 32), "w_dec": rand(rng, 32, 8), "b_enc": rand(rng, 32) * 0.1, "b_dec": rand(rng, 8),
         "threshold": np.abs(rand(rng, 32)) * 0.3}
    np.savez(tmp_path / "params.npz", **p)
    put(release, {f"{path_of(release, sae_id)}/params.npz": tmp_path / "params.npz"})
    x = rng.normal(size=(4, 2, 4) if "att" in release else (4, 8)).astype(np.float32)
    sae, _ = assert_matches_saelens(release, sae_id, x)
    assert sae.cfg.reshape_activations == ("hook_z" if "att" in release else "none")


def test_gemma_3_cross_layer_transcoder(tmp_path, monkeypatch, gemma_3_shapes_offline):
    """A Gemma Scope 2 cross-layer transcoder file (`<folder>/<name>.safetensors`, w_dec per output layer)
    loads with its decoders summed over layers. The registry lists none yet: both libraries get one entry."""
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    release, sae_id, path, repo_id = "gemma-scope-2-270m-pt-clt-test", "layer_3", "clt/layer_3_width_16k", \
        "google/gemma-scope-2-270m-pt"
    monkeypatch.setitem(get_pretrained_saes_directory(), release, PretrainedSAELookup(
        release=release, repo_id=repo_id, model="google/gemma-3-270m", conversion_func="gemma_3",
        saes_map={sae_id: path}, expected_var_explained={}, expected_l0={}, neuronpedia_id={},
        norm_scaling_factor={}, config_overrides=None))
    monkeypatch.setitem(releases.snapshot_registry(), release, releases.Release(
        name=release, repo_id=repo_id, model="google/gemma-3-270m", conversion_func="gemma_3",
        saes={sae_id: {"id": sae_id, "path": path}}, config_overrides={}))
    rng = np.random.default_rng(8)
    tensors = {"w_enc": rand(rng, 8, 32), "w_dec": rand(rng, 32, 5, 6), "b_enc": rand(rng, 32) * 0.1,
               "b_dec": rand(rng, 6), "threshold": np.abs(rand(rng, 32)) * 0.3}
    populate_hub_cache(repo_id, {"clt/layer_3_width_16k.safetensors": st_bytes(tmp_path, tensors),
                                 "clt/layer_3_width_16k/config.json": json.dumps(
                                     {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                                      "affine_connection": False}).encode()})
    x = rng.normal(size=(6, 8)).astype(np.float32)
    sae, _ = assert_matches_saelens(release, sae_id, x, rounded=("W_dec",))
    assert sae.cfg.architecture == "jumprelu_transcoder" and sae.cfg.d_out == 6
    np.testing.assert_allclose(np.asarray(sae.W_dec), tensors["w_dec"].sum(axis=1), rtol=1e-6)


def test_sparsify_hub_folder_detected(tmp_path):
    """An 'owner/repo' id outside the registry holding a sparsify folder loads as the local folder does.

    (No registry release uses SAELens' sparsify loader, and that loader transposes sparsify's
    (num_latents, d_in) W_dec, so it rejects non-square files: jsae keeps sparsify's own layout,
    checked against sparsify's formula in test_formats.)
    """
    from test_formats import sparsify_folder

    sparsify_folder(tmp_path / "layers.3", np.random.default_rng(9), d_in=8, n_latents=32, k=4)
    populate_hub_cache("someone/sparsify-saes", {f"layers.3/{f}": tmp_path / "layers.3" / f
                                                  for f in ("cfg.json", "sae.safetensors")})
    sae = jsae.SAE.from_pretrained("someone/sparsify-saes", "layers.3")
    local = jsae.SAE.load_from_disk(tmp_path / "layers.3")
    assert sae.cfg == local.cfg and sae.cfg.architecture == "topk" and sae.cfg.k == 4
    for name, value in local.params.items():
        np.testing.assert_array_equal(bits(np.asarray(sae.params[name])), bits(np.asarray(value)), err_msg=name)
