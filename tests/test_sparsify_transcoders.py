"""EleutherAI sparsify transcoder and skip-transcoder folders, written by sparsify itself (eai-sparsify, in the
test extra), load in jsae and compute what sparsify computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hub_cache import populate_hub_cache
from saelens_helpers import rel_err

import jsae

sparsify = pytest.importorskip("sparsify")
torch = pytest.importorskip("torch")

D_IN, LATENTS, K = 12, 40, 5


def sparsify_coder(tmp_path, *, hookpoint="layers.3.mlp", seed=0, **cfg):
    """A sparsify SparseCoder with every parameter random, saved by sparsify into tmp_path/hookpoint."""
    config = sparsify.SparseCoderConfig(num_latents=LATENTS, k=K, **cfg)
    coder = sparsify.SparseCoder(D_IN, config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    coder.save_to_disk(tmp_path / hookpoint)
    return coder, tmp_path / hookpoint


def sparsify_outputs(coder, x):
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        acts = torch.zeros(x.shape[0], LATENTS).scatter_(-1, top_indices, top_acts)
        return acts, coder.decode(top_acts, top_indices), coder(x).sae_out


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_folder_matches_sparsify(tmp_path, skip):
    coder, folder = sparsify_coder(tmp_path, transcode=True, skip_connection=skip)
    sae = jsae.SAE.load_from_disk(folder)
    assert sae.cfg.architecture == ("topk_skip_transcoder" if skip else "topk_transcoder")
    assert (sae.cfg.d_in, sae.cfg.d_out, sae.cfg.d_sae, sae.cfg.k) == (D_IN, D_IN, LATENTS, K)
    assert not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == "blocks.3.mlp.hook_in"
    assert sae.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    state = {k: v.detach().numpy() for k, v in coder.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(sae.params["W_enc"]), state["encoder.weight"].T)
    np.testing.assert_array_equal(np.asarray(sae.params["W_dec"]), state["W_dec"])
    if skip:
        np.testing.assert_array_equal(np.asarray(sae.params["W_skip"]), state["W_skip"])

    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(1)) * 1.5
    acts, recon, out = sparsify_outputs(coder, x)
    got_acts = np.asarray(sae.encode(x.numpy()))
    assert np.array_equal(got_acts != 0, acts.numpy() != 0)
    assert rel_err(got_acts, acts.numpy()) <= 1e-5
    assert rel_err(sae.decode(got_acts), recon.numpy()) <= 1e-5  # decode has no skip term, as in sparsify
    assert rel_err(sae(x.numpy()), out.numpy()) <= 1e-5

    sae.save_model(tmp_path / "jsae")  # jsae's own folder of it loads back unchanged
    again = jsae.SAE.load_from_disk(tmp_path / "jsae")
    assert again.cfg.replace(metadata=sae.cfg.metadata) == sae.cfg
    assert rel_err(again(x.numpy()), out.numpy()) <= 1e-5


def test_sparsify_skip_transcoder_from_the_hub(tmp_path):
    """A Hub repository of sparsify folders (the real EleutherAI skip-transcoder repo id), read by from_pretrained."""
    coder, folder = sparsify_coder(tmp_path, hookpoint="layers.7.mlp", seed=2, transcode=True, skip_connection=True)
    populate_hub_cache("EleutherAI/skip-transcoder-Llama-3.2-1B-131k", {
        "layers.7.mlp/cfg.json": folder / "cfg.json",
        "layers.7.mlp/sae.safetensors": folder / "sae.safetensors",
        "config.json": json.dumps({"model": "meta-llama/Llama-3.2-1B"}).encode(),
    })
    sae = jsae.SAE.from_pretrained("EleutherAI/skip-transcoder-Llama-3.2-1B-131k", "layers.7.mlp")
    assert sae.cfg.architecture == "topk_skip_transcoder" and sae.cfg.metadata.hook_name == "blocks.7.mlp.hook_in"
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    assert rel_err(sae(x.numpy()), sparsify_outputs(coder, x)[2].numpy()) <= 1e-5


@pytest.mark.parametrize("cfg, match", [
    ({"transcode": True, "activation": "groupmax"}, "groupmax"),
    ({"transcode": False, "skip_connection": True}, "skip_connection without transcode"),
])
def test_sparsify_folders_jsae_cannot_express_are_clear_errors(tmp_path, cfg, match):
    _, folder = sparsify_coder(tmp_path, **cfg)
    with pytest.raises(jsae.FormatError, match=match):
        jsae.SAE.load_from_disk(folder)
