"""Compare `jsae.SAE.from_pretrained` with `sae_lens.SAE.from_pretrained` on miniatures in the Hub cache."""

from __future__ import annotations

import numpy as np
import torch
from saelens_helpers import TORCH_DTYPES, rel_err, to_numpy

import jsae
from jsae import releases

CFG_FIELDS = ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "reshape_activations")
# compared only where sae_lens' cfg has them (architecture-specific)
EXTRA_FIELDS = ("k", "d_out", "n_heads", "n_attn_layers", "bottleneck_factor", "sae_diff_type", "kval_topk",
                "tied_weights", "activation_normalization_factor")
METADATA_FIELDS = ("model_name", "hook_name", "hook_name_out", "hook_head_index", "hook_head_index_out",
                   "hf_hook_name", "hf_hook_name_out", "neuronpedia_id", "dataset_path", "context_size",
                   "prepend_bos", "model_from_pretrained_kwargs")


def rand(rng, *shape, scale=0.3):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def path_of(release, sae_id):
    return releases.get_release(release).path(sae_id)


def bits(a):
    """The raw bytes of an array, so equal means bit-identical (NaN payloads and -0.0 included)."""
    return np.ascontiguousarray(a).view(np.uint8)


def answer_tensor_shapes_from_cache(monkeypatch):
    """SAELens asks the Hub for safetensors tensor shapes over HTTP; answer from the cached file instead."""
    from huggingface_hub import hf_hub_download
    from sae_lens.loading import pretrained_sae_loaders
    from safetensors import safe_open

    def shapes(repo_id, filename):
        with safe_open(hf_hub_download(repo_id, filename), framework="np") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", shapes)


def assert_matches_saelens(release, sae_id, x, *, dtype="float32", rounded=()):
    """jsae and sae_lens load the same SAE: tensors bit for bit, cfg fields, outputs within 1e-5.

    Tensors named in `rounded` are computed, not copied: exp() of a stored log threshold (torch's
    vectorised exp is not correctly rounded) or a sum over layers (torch's reduction order is its
    own); those match to float32 rounding (1e-6 of the tensor's largest value) instead of bit for bit.
    """
    import sae_lens

    ref = sae_lens.SAE.from_pretrained(release, sae_id, dtype=dtype)
    sae = jsae.SAE.from_pretrained(release, sae_id, dtype=dtype)
    ref_params = {k: to_numpy(v) for k, v in ref.state_dict().items()}
    assert set(sae.params) == set(ref_params)
    for name, value in ref_params.items():
        ours = np.asarray(sae.params[name])
        assert ours.dtype == value.dtype, name
        if name in rounded:
            scale = float(np.abs(value.astype(np.float32)).max())
            np.testing.assert_allclose(ours.astype(np.float32), value.astype(np.float32), rtol=1e-6, atol=1e-6 * scale)
        else:
            np.testing.assert_array_equal(bits(ours), bits(value), err_msg=name)
    ref_cfg = ref.cfg.to_dict()
    assert sae.cfg.architecture == ref.cfg.architecture()
    for field in CFG_FIELDS + tuple(f for f in EXTRA_FIELDS if f in ref_cfg):
        assert getattr(sae.cfg, field) == ref_cfg[field], field
    for field in METADATA_FIELDS:
        assert sae.cfg.metadata.get(field) == getattr(ref.cfg.metadata, field, None), field
    xt = torch.from_numpy(x).to(TORCH_DTYPES[dtype])
    with torch.no_grad():
        ref_feats = ref.encode(xt)
        expect = {"encode": ref_feats, "decode": ref.decode(ref_feats), "forward": ref(xt)}
    feats = sae.encode(x)
    got = {"encode": feats, "decode": sae.decode(feats), "forward": sae(x)}
    tol = 1e-5 if dtype == "float32" else 2e-2
    for name in expect:
        assert rel_err(np.asarray(got[name], np.float32), expect[name].float().numpy()) <= tol, name
    assert np.count_nonzero(np.asarray(feats)) > 0
    return sae, ref
