"""The gemma_2_transcoder, mwhanna_transcoder, mntss_clt_layer_transcoder, temporal and goodfire
conversion funcs, on miniatures of real releases in the Hub cache.

Files are written as each release stores them (real repo ids, paths, file names and config files;
tiny widths, random weights) and `jsae.SAE.from_pretrained` is compared with
`sae_lens.SAE.from_pretrained` on the same cache: every tensor bit for bit, the config fields that
matter, and encode / decode / forward within 1e-5. Where SAELens reads a width from a name or a
table (Gemma Scope transcoders, Goodfire) the test shrinks SAELens' answer to the miniature's (jsae
reads widths off the tensors), and the configs of the real names are compared separately; where it
asks the Hub for tensor shapes over HTTP (mntss) the test answers from the cached file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from hub_cache import populate_hub_cache
from pretrained_helpers import answer_tensor_shapes_from_cache, assert_matches_saelens, path_of, rand
from safetensors.numpy import save_file

import jsae
from jsae import releases
from jsae.converters import goodfire, transcoders

sae_lens = pytest.importorskip("sae_lens")
loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")

def file_of(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    return path


def safetensors_file(tmp_path, state, name="w.safetensors"):
    return file_of(tmp_path, name, lambda p: save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(p)))


def put(release, files):
    """Write `files` (path in repo -> local file, bytes, or a dict written as YAML) into the release's repo."""
    repo_id = releases.get_release(release).repo_id
    populate_hub_cache(repo_id, {k: yaml.safe_dump(v).encode() if isinstance(v, dict) else v
                                 for k, v in files.items()})


# --------------------------------------------------------------------------- gemma_2_transcoder
GEMMA_TRANSCODERS = ("gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_54")


def test_gemma_2_transcoder_config_of_the_real_names():
    release, sae_id = GEMMA_TRANSCODERS
    repo_id, folder = releases.get_release(release).repo_id, path_of(release, sae_id)
    want = loaders.get_gemma_2_transcoder_config_from_hf(repo_id, folder, "cpu")
    got = transcoders.gemma_2_transcoder_config(repo_id, folder)
    assert {k: want[k] for k in got} == got
    assert (got["d_in"], got["d_out"], got["d_sae"]) == (2304, 2304, 16384)


def test_gemma_2_transcoder(tmp_path, monkeypatch):
    release, sae_id = GEMMA_TRANSCODERS
    real = loaders.get_gemma_2_transcoder_config_from_hf
    # SAELens reads 2304 x 16384 off the names; the miniature is 8 x 32
    monkeypatch.setattr(loaders, "get_gemma_2_transcoder_config_from_hf",
                        lambda *a, **k: real(*a, **k) | {"d_in": 8, "d_out": 8, "d_sae": 32})
    rng = np.random.default_rng(0)
    arrays = {"W_enc": rand(rng, 8, 32), "W_dec": rand(rng, 32, 8), "b_enc": rand(rng, 32) * 0.1,
              "b_dec": rand(rng, 8), "threshold": np.abs(rand(rng, 32)) * 0.2}
    npz = file_of(tmp_path, "params.npz", lambda p: np.savez(p, **arrays))
    put(release, {f"{path_of(release, sae_id)}/params.npz": npz})
    sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(6, 8)).astype(np.float32))
    assert sae.cfg.architecture == "jumprelu_transcoder"
    assert sae.cfg.metadata.hook_name == "blocks.3.ln2.hook_normalized"
    assert sae.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    assert sae.cfg.metadata.neuronpedia_id == "gemma-2-2b/3-gemmascope-transcoder-16k"


# --------------------------------------------------------------------------- mwhanna_transcoder
def wandb_config(d_model=8, d_feature=32):
    return {"d_model": {"value": d_model}, "d_feature": {"value": d_feature}, "batch_size": {"value": 4096},
            "lr": {"value": 4e-4}}


@pytest.mark.parametrize("release, wandb_name, base_config", [
    ("mwhanna-qwen3-4b-transcoders", "wandb-config.yaml", {"model_name": "Qwen/Qwen3-4B"}),
    # the 14b repositories have no config.yaml and a misspelt wandb config
    ("mwhanna-qwen3-14b-transcoders", "wanb-config.yaml", None),
])
def test_mwhanna_transcoder(tmp_path, release, wandb_name, base_config):
    sae_id = "layer_5"
    rng = np.random.default_rng(1)
    state = {"W_enc": rand(rng, 32, 8), "W_dec": rand(rng, 32, 8), "b_enc": rand(rng, 32) * 0.1, "b_dec": rand(rng, 8)}
    files = {path_of(release, sae_id): safetensors_file(tmp_path, state), wandb_name: wandb_config()}
    if base_config is not None:
        files["config.yaml"] = base_config
    put(release, files)
    sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(6, 8)).astype(np.float32))
    assert sae.cfg.architecture == "transcoder" and sae.cfg.metadata.hook_name == "blocks.5.mlp.hook_in"
    assert sae.cfg.metadata.model_name == (base_config or {"model_name": "Qwen/Qwen3-14B"})["model_name"]


# --------------------------------------------------------------------------- mntss_clt_layer_transcoder
@pytest.fixture
def tensor_shapes_offline(monkeypatch):
    answer_tensor_shapes_from_cache(monkeypatch)


def test_mntss_clt_layer_transcoder(tmp_path, tensor_shapes_offline):
    release, sae_id = "mntss-gemma-2-2b-2.5m-clt-as-per-layer", "layer_2"
    n = path_of(release, sae_id)
    assert n == "2"
    rng = np.random.default_rng(2)
    # 64 wide (released widths are multiples of 64, where torch sums the 20 target layers in a fixed
    # order jsae reproduces bit for bit)
    encoder = {f"W_enc_{n}": rand(rng, 32, 64), f"b_enc_{n}": rand(rng, 32) * 0.1, f"b_dec_{n}": rand(rng, 64)}
    decoder = {f"W_dec_{n}": rand(rng, 32, 20, 64)}  # to this layer and the 19 after it
    put(release, {
        "config.yaml": {"model_name": "google/gemma-2-2b", "feature_input_hook": "hook_resid_mid",
                        "feature_output_hook": "hook_mlp_out"},
        f"W_enc_{n}.safetensors": safetensors_file(tmp_path, encoder, "enc.safetensors"),
        f"W_dec_{n}.safetensors": safetensors_file(tmp_path, decoder, "dec.safetensors"),
    })
    x = rng.normal(size=(6, 64)).astype(np.float32)
    for dtype in ("float32", "bfloat16"):  # cast first, then summed with float32 accumulation, as torch does
        with pytest.warns(UserWarning, match="summing all decoders"):
            sae, _ = assert_matches_saelens(release, sae_id, x, dtype=dtype)
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_mid"
    assert sae.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    assert sae.cfg.metadata.model_from_pretrained_kwargs == {"fold_ln": False}


# --------------------------------------------------------------------------- temporal
TEMPORAL = {  # release, sae_id, tied
    "tied": ("temporal-sae-gemma-2-2b", "blocks.12.hook_resid_post", True),
    "untied": ("temporal-sae-llama-3.1-8b", "blocks.26.hook_resid_post", False),
}


@pytest.mark.parametrize("case", list(TEMPORAL))
def test_temporal(tmp_path, case):
    release, sae_id, tied = TEMPORAL[case]
    d_in, exp, heads, bottleneck = 8, 4, 2, 4
    d_sae = d_in * exp
    rng = np.random.default_rng(3)
    conf = {"llm": {"dimin": d_in}, "data": {"dtype": "bfloat16"},
            "sae": {"exp_factor": exp, "n_heads": heads, "n_attn_layers": 1, "bottleneck_factor": bottleneck,
                    "sae_diff_type": "topk", "kval_topk": 6, "tied_weights": tied, "scaling_factor": 0.4}}
    state = {"D": rand(rng, d_sae, d_in, scale=1.0), "b": rand(rng, d_in)}
    if not tied:
        state["E"] = rand(rng, d_in, d_sae, scale=1.0)
    n_embds = d_sae // bottleneck
    for proj, width in (("k_ctx", n_embds), ("q_target", n_embds), ("v_ctx", d_sae), ("c_proj", d_sae)):
        state[f"attn_layers.0.{proj}.weight"] = rand(rng, width, d_sae)
        state[f"attn_layers.0.{proj}.bias"] = rand(rng, width) * 0.1
    folder = path_of(release, sae_id)
    put(release, {f"{folder}/conf.yaml": conf,
                  f"{folder}/latest_ckpt.safetensors": safetensors_file(tmp_path, state)})
    x = (rng.normal(size=(2, 5, d_in)) * 3).astype(np.float32)
    sae, _ = assert_matches_saelens(release, sae_id, x)
    assert sae.cfg.normalize_activations == "constant_scalar_rescale"
    assert sae.cfg.activation_normalization_factor == 0.4
    assert sae.cfg.metadata.hook_name == sae_id


# --------------------------------------------------------------------------- goodfire
GOODFIRE = ("goodfire-llama-3.1-8b-instruct", "layer_19")


@pytest.mark.parametrize("release", ["goodfire-llama-3.1-8b-instruct", "goodfire-llama-3.3-70b-instruct"])
def test_goodfire_config_of_the_real_names(release):
    entry = releases.get_release(release)
    sae_id = next(iter(entry.saes))
    repo_id, file = entry.repo_id, entry.path(sae_id)
    want = loaders.get_goodfire_config_from_hf(repo_id, file, None)
    got = goodfire.goodfire_config(repo_id, file)
    assert {k: want[k] for k in got} == got


def test_goodfire(tmp_path, monkeypatch):
    release, sae_id = GOODFIRE
    real = loaders.get_goodfire_config_from_hf
    # SAELens hard-codes 4096 x 65536; the miniature is 8 x 32
    monkeypatch.setattr(loaders, "get_goodfire_config_from_hf", lambda *a, **k: real(*a, **k) | {"d_in": 8, "d_sae": 32})
    rng = np.random.default_rng(4)
    state = {"encoder_linear.weight": rand(rng, 32, 8), "encoder_linear.bias": rand(rng, 32) * 0.1,
             "decoder_linear.weight": rand(rng, 8, 32), "decoder_linear.bias": rand(rng, 8)}
    pt = file_of(tmp_path, "sae.pth", lambda p: torch.save({k: torch.from_numpy(v) for k, v in state.items()}, p))
    put(release, {path_of(release, sae_id): pt})
    sae, _ = assert_matches_saelens(release, sae_id, rng.normal(size=(6, 8)).astype(np.float32))
    assert sae.cfg.architecture == "standard" and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == "blocks.19.hook_resid_post"


def test_unknown_goodfire_file_is_a_clear_error():
    with pytest.raises(jsae.ConfigError, match="not a Goodfire SAE"):
        goodfire.goodfire_config("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "other.pth")
