"""jsae against the real sae_lens: same outputs both ways, bit-identical round trips."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from saelens_helpers import TORCH_DTYPES, TRANSCODERS, VARIANTS, make_saelens_sae, rel_err, to_numpy

import jsae
from jsae.io import config_from_dict

sae_lens = pytest.importorskip("sae_lens")

NORMS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def cases():
    for variant, (arch, _) in VARIANTS.items():
        for dtype in ("float32", "bfloat16"):
            for b_dec in (True, False):
                if arch in TRANSCODERS and b_dec:
                    continue  # transcoders never subtract b_dec (b_dec has width d_out)
                for norm in NORMS:
                    yield pytest.param(variant, dtype, b_dec, norm, id=f"{variant}-{dtype}-bdec{int(b_dec)}-{norm}")


def torch_input(shape, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2 + 0.5).to(TORCH_DTYPES[dtype])


def untied_rows(sae, x, k):
    """Rows whose k-th and (k+1)-th pre-activations differ: top-k picks the same latents there.

    Tied values (common in bf16) make the choice between equal latents arbitrary in both
    libraries, so only untied rows are compared, and most rows must be untied.
    """
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    ordered = -np.sort(-np.asarray(hidden_pre, dtype=np.float32), axis=-1)
    keep = ordered[:, k - 1] != ordered[:, k]
    assert keep.mean() >= 0.75, f"too many tied rows ({(~keep).sum()} of {len(keep)})"
    return torch.from_numpy(np.flatnonzero(keep))


def saelens_outputs(sae, x):
    with torch.no_grad():
        feats = sae.encode(x)
        recon = sae.decode(feats)  # uses the stats of the encode just above, as jsae's decode does
        out = sae(x)
    return feats, recon, out


def assert_close(name, got, want, dtype):
    err = rel_err(got, to_numpy(want) if isinstance(want, torch.Tensor) else want)
    assert err <= TOL[dtype], f"{name}: relative max diff {err:.3g} > {TOL[dtype]}"


def saelens_tensors(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


@pytest.mark.parametrize(("variant", "dtype", "b_dec", "norm"), list(cases()))
def test_saelens_to_jsae_to_saelens(tmp_path, variant, dtype, b_dec, norm):
    ref = make_saelens_sae(variant, dtype=dtype, apply_b_dec_to_input=b_dec, normalize_activations=norm)
    ref.save_model(tmp_path / "ref")
    ref_cfg = json.loads((tmp_path / "ref" / "cfg.json").read_text())

    sae = jsae.SAE.load_from_disk(tmp_path / "ref")
    assert sae.cfg.architecture == VARIANTS[variant][0]
    assert sae.cfg.dtype == dtype

    x = torch_input((64, ref.cfg.d_in), dtype)
    if "k" in ref.cfg.to_dict():
        x = x[untied_rows(sae, to_numpy(x), ref.cfg.k)]
    feats, recon, out = saelens_outputs(ref, x)
    xj = to_numpy(x)
    got_feats = sae.encode(xj)
    assert_close("encode", got_feats, feats, dtype)
    assert_close("decode", sae.decode(to_numpy(feats)), recon, dtype)
    assert_close("forward", sae(xj), out, dtype)

    # jsae -> disk -> sae_lens: same outputs, bit-identical tensors, cfg fields kept.
    sae.save_model(tmp_path / "jsae")
    back = sae_lens.SAE.load_from_disk(str(tmp_path / "jsae"))
    for key, tensor in saelens_tensors(ref).items():
        assert torch.equal(back.state_dict()[key], tensor), f"tensor {key} changed on the round trip"
    assert set(back.state_dict()) == set(ref.state_dict())
    back_cfg = json.loads((tmp_path / "jsae" / "cfg.json").read_text())
    assert back_cfg == ref_cfg
    assert back.cfg.to_dict() == ref.cfg.to_dict()
    feats2, recon2, out2 = saelens_outputs(back, x)
    assert_close("sae_lens(jsae folder) encode", got_feats, feats2, dtype)
    assert_close("sae_lens(jsae folder) forward", sae(xj), out2, dtype)


@pytest.mark.parametrize("variant", [v for v, (a, _) in VARIANTS.items() if a not in TRANSCODERS])
def test_error_term_forward_returns_input(variant):
    ref = make_saelens_sae(variant)
    sae = jsae.SAE(config_from_dict(ref.cfg.to_dict()), {k: to_numpy(v) for k, v in ref.state_dict().items()})
    x = torch_input((8, 16), "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.use_error_term = True
    with torch.no_grad():
        want = ref(x)
    got = sae(to_numpy(x), use_error_term=True)
    assert rel_err(got, to_numpy(want)) <= 1e-5
    assert rel_err(got, to_numpy(x)) <= 1e-5
    assert rel_err(sae(to_numpy(x)), to_numpy(x)) > 1e-2  # without the error term it is a reconstruction


@pytest.mark.parametrize("variant", ["standard", "jumprelu", "topk_rescaled", "gated"])
def test_hook_z_reshape_matches(tmp_path, variant):
    meta = {"hook_name": "blocks.0.attn.hook_z", "model_name": "toy"}
    ref = make_saelens_sae(variant, reshape_activations="hook_z", metadata=meta)
    ref.save_model(tmp_path)
    sae = jsae.SAE.load_from_disk(tmp_path)
    x = torch_input((5, 7, 4, 4), "float32")  # (batch, pos, n_heads, d_head), d_in = 16
    feats, recon, out = saelens_outputs(ref, x)
    assert sae.encode(to_numpy(x)).shape == (5, 7, 48)
    assert_close("encode", sae.encode(to_numpy(x)), feats, "float32")
    assert sae.decode(to_numpy(feats)).shape == (5, 7, 4, 4)
    assert_close("decode", sae.decode(to_numpy(feats)), recon, "float32")
    assert_close("forward", sae(to_numpy(x)), out, "float32")


@pytest.mark.parametrize(
    "variant", ["standard", "gated", "jumprelu", "topk_rescaled", "transcoder", "jumprelu_transcoder"]
)
def test_fold_W_dec_norm_matches_saelens(tmp_path, variant):
    ref = make_saelens_sae(variant)
    ref.save_model(tmp_path)
    sae = jsae.SAE.load_from_disk(tmp_path)
    folded = sae.fold_W_dec_norm()
    ref.fold_W_dec_norm()
    for key, tensor in ref.state_dict().items():
        assert rel_err(folded.params[key], to_numpy(tensor)) <= 1e-6, key
    norms = np.linalg.norm(np.asarray(folded.params["W_dec"]), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    x = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    assert rel_err(folded(x), sae(x)) <= 1e-5  # folding leaves outputs unchanged
    # The original SAE is not modified.
    assert not np.allclose(np.linalg.norm(np.asarray(sae.params["W_dec"]), axis=-1), 1.0)


def test_fold_W_dec_norm_refused_for_topk_without_rescale(tmp_path):
    make_saelens_sae("topk").save_model(tmp_path)
    with pytest.raises(jsae.ConfigError, match="rescale_acts_by_decoder_norm"):
        jsae.SAE.load_from_disk(tmp_path).fold_W_dec_norm()


@pytest.mark.parametrize("variant", ["standard", "topk", "jumprelu", "gated"])
def test_fold_activation_norm_scaling_factor_matches_saelens(tmp_path, variant):
    ref = make_saelens_sae(variant, normalize_activations="expected_average_only_in")
    ref.save_model(tmp_path)
    sae = jsae.SAE.load_from_disk(tmp_path)
    folded = sae.fold_activation_norm_scaling_factor(2.7)
    ref.fold_activation_norm_scaling_factor(2.7)
    assert folded.cfg.normalize_activations == ref.cfg.normalize_activations == "none"
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    for key, tensor in ref.state_dict().items():
        assert rel_err(folded.params[key], to_numpy(tensor)) <= 1e-6, key
