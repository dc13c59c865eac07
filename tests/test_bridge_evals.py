"""A jsae SAE spliced into the running model: CE / KL metrics equal sae_lens' get_recons_loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saelens_helpers import make_saelens_sae

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    from bridge.model import load_model

    return load_model("embedded")


@pytest.fixture(scope="module")
def tokens(model):
    from bridge.runner import RunConfig, token_rows

    cfg = RunConfig.from_dict({"sae": {"architecture": "standard", "d_in": 128, "d_sae": 256},
                               "total_training_tokens": 10**5, "context_size": 64})
    rows = token_rows(cfg, model, split="heldout", cycle=False)
    return torch.tensor([next(rows) for _ in range(8)])


def saelens_and_jsae(tmp_path, variant):
    """A sae_lens SAE with weights sized for this model's residual stream, and the same SAE loaded by jsae."""
    ref = make_saelens_sae(variant, d_in=128, d_sae=512, metadata={"hook_name": HOOK, "model_name": "embedded"})
    with torch.no_grad():
        ref.W_dec.mul_(0.05)
        ref.W_enc.mul_(0.2)
    ref.save_model(tmp_path / "sae")
    return ref, jsae.SAE.load_from_disk(tmp_path / "sae")


@pytest.mark.parametrize("variant", ["standard", "topk", "jumprelu"])
def test_recons_loss_matches_saelens(tmp_path, model, tokens, variant):
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    from bridge.evals import downstream_reconstruction_metrics, recons_loss

    ref, sae = saelens_and_jsae(tmp_path, variant)
    ignore = [model.tokenizer.bos_token_id]
    want = get_recons_loss(ref, model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True,
                           ignore_tokens=ignore)
    got = recons_loss(model, sae, tokens, ignore_tokens=ignore)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    metrics = downstream_reconstruction_metrics(model, sae, [tokens[:4], tokens[4:]], ignore_tokens=ignore)
    assert metrics["ce_loss_with_ablation"] > metrics["ce_loss_without_sae"]
    ce = {k: torch.cat([v[~torch.isin(tokens[:, :-1] if v.shape[1] < tokens.shape[1] else tokens,
                                        torch.tensor(ignore))]]).mean().item() for k, v in want.items()}
    score = (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"]) / (
        ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"])
    assert metrics["ce_loss_score"] == pytest.approx(score, rel=1e-4)


def test_error_term_splice_is_exact(model, tokens):
    from bridge.evals import run_with_cache_with_saes, run_with_saes

    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=128, d_sae=512, k=16), seed=0)
    with torch.no_grad():
        clean = model(tokens)
        spliced = run_with_saes(model, tokens, {HOOK: sae}, use_error_term=True)
        torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
        recon_only = run_with_saes(model, tokens, {HOOK: sae})
        assert (recon_only - clean).abs().max() > 1e-2
        # the pure-torch reference: the same SAE written with torch ops
        p = {k: torch.from_numpy(np.asarray(v)) for k, v in sae.params.items()}

        def torch_sae(acts, hook=None):
            pre = (acts - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
            top = torch.topk(pre, 16, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
            return f @ p["W_dec"] + p["b_dec"]

        reference = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, torch_sae)])
        torch.testing.assert_close(recon_only, reference, rtol=1e-4, atol=1e-4)
        _, cache = run_with_cache_with_saes(model, tokens, {HOOK: sae})
        assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (8, 64, 512)
        assert int((cache[f"{HOOK}.hook_sae_acts_post"] > 0).sum(-1).max()) <= 16


@pytest.mark.parametrize("variant", ["standard", "topk", "jumprelu"])
def test_sparsity_and_variance_metrics_match_saelens(tmp_path, model, tokens, variant):
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from bridge.evals import sparsity_and_variance_metrics

    ref, sae = saelens_and_jsae(tmp_path, variant)
    batches = [tokens[:4], tokens[4:]]
    ignore = [model.tokenizer.bos_token_id]
    want, want_features = get_sparsity_and_variance_metrics(
        ref, model, TokenStore(batches), ActivationScaler(), n_batches=2, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=4,
        model_kwargs={}, ignore_tokens=ignore)
    got, got_features = sparsity_and_variance_metrics(model, sae, batches, ignore_tokens=ignore)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, values in want_features.items():
        np.testing.assert_allclose(got_features[name], np.asarray(values, np.float64), rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("variant", ["standard", "gated", "topk"])
def test_featurewise_weight_metrics_match_saelens(tmp_path, variant):
    from sae_lens.evals import get_featurewise_weight_based_metrics

    from jsae.evals import featurewise_weight_metrics

    ref = make_saelens_sae(variant)
    ref.save_model(tmp_path / "sae")
    got = featurewise_weight_metrics(jsae.SAE.load_from_disk(tmp_path / "sae").params)
    want = get_featurewise_weight_based_metrics(ref)
    assert set(got) == set(want)
    for name, values in want.items():
        np.testing.assert_allclose(got[name], np.asarray(values), rtol=1e-5, atol=1e-6, err_msg=name)


class TokenStore:
    """The parts of sae_lens' ActivationsStore that run_evals uses, serving fixed token batches."""

    def __init__(self, batches):
        self.batches = batches
        self.store_batch_size_prompts = len(batches[0])
        self.context_size = batches[0].shape[1]
        self.reset_input_dataset()

    def reset_input_dataset(self):
        self.it = iter(self.batches)

    def get_batch_tokens(self, n):
        batch = next(self.it)
        assert len(batch) == n
        return batch


@pytest.mark.parametrize("variant", ["standard", "topk", "jumprelu"])
def test_run_evals_matches_saelens(tmp_path, model, tokens, variant):
    from sae_lens.evals import get_eval_everything_config
    from sae_lens.evals import run_evals as saelens_run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    from bridge.evals import run_evals
    from jsae.evals import EvalConfig

    ref, sae = saelens_and_jsae(tmp_path, variant)
    batches = [tokens[:4], tokens[4:]]
    want, want_features = saelens_run_evals(
        ref, TokenStore(batches), model, ActivationScaler(),
        get_eval_everything_config(n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=1))
    got, got_features = run_evals(sae, model, batches, EvalConfig.everything(
        n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=1))
    assert {g: set(v) for g, v in got.items()} == {g: set(v) for g, v in want.items()}
    for group, values in want.items():
        for name, value in values.items():
            assert got[group][name] == pytest.approx(value, rel=1e-4, abs=1e-7), f"{group}/{name}"
    assert set(got_features) == set(want_features)
    for name, values in want_features.items():
        np.testing.assert_allclose(got_features[name], np.asarray(values, np.float64), rtol=1e-4, atol=1e-7,
                                   err_msg=name)
    # a narrower config computes only its groups
    only_ce, features = run_evals(sae, model, batches, EvalConfig(compute_ce_loss=True, n_eval_reconstruction_batches=1))
    assert set(only_ce) == {"model_performance_preservation", "token_stats"} and features == {}
