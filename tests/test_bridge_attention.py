"""The fused attention forward equals TransformerLens' own, hooks included, and steps aside when it must."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridge.attention import covered, fused_attention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

BASE = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=24, d_vocab=97, act_fn="gelu", seed=0)
COVERED = {
    "standard": {},
    "shortformer, scaled by layer": dict(positional_embedding_type="shortformer", scale_attn_by_inverse_layer_idx=True),
    "rotary, grouped query, RMS": dict(positional_embedding_type="rotary", rotary_dim=16, n_key_value_heads=2,
                                       normalization_type="RMS", act_fn="silu"),
    "rotary, ungrouped": dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                              ungroup_grouped_query_attention=True),
    "no attention scale": dict(use_attn_scale=False),
    "split qkv input": dict(use_split_qkv_input=True),
}
NOT_COVERED = {
    "alibi": dict(positional_embedding_type="alibi"),
    "soft-capped scores": dict(attn_scores_soft_cap=30.0),
    "local windows": dict(use_local_attn=True, attn_types=["local", "local"], window_size=5),
    "bidirectional": dict(attention_dir="bidirectional"),
    "per-head results": dict(use_attn_result=True),
}
CACHED = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k", "hook_resid_post", "hook_attn_out")


def make_model(**overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**(BASE | overrides)))
    with torch.no_grad():  # visible biases, so a wrongly placed one shows
        for name, param in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V")):
                param.normal_(0.0, 0.5)
    return model.eval()


def tokens(model, rows=3):
    return torch.randint(0, model.cfg.d_vocab, (rows, model.cfg.n_ctx), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times torch's fused attention kernel ran."""
    calls = []
    kernel = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def run(model, toks, **kwargs):
    with torch.no_grad():
        return model.run_with_cache(toks, names_filter=lambda name: name.endswith(CACHED), **kwargs)


@pytest.mark.parametrize("overrides", COVERED.values(), ids=COVERED.keys())
def test_fused_forward_equals_transformer_lens_hooks_included(overrides, fused_calls):
    model = make_model(**overrides)
    toks = tokens(model)
    want_logits, want = run(model, toks)
    assert not fused_calls
    with fused_attention(model) as switched:
        got_logits, got = run(model, toks)
    assert switched == model.cfg.n_layers
    assert len(fused_calls) == model.cfg.n_layers  # the fused kernel did the work
    assert set(got.keys()) == set(want.keys()) and any("hook_z" in k for k in want.keys())
    for name in want.keys():
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", NOT_COVERED.values(), ids=NOT_COVERED.keys())
def test_configurations_it_does_not_cover_keep_transformer_lens_attention(overrides, fused_calls):
    model = make_model(**overrides)
    assert not any(covered(block.attn) for block in model.blocks)
    toks = tokens(model)
    want, _ = run(model, toks)
    with fused_attention(model) as switched:
        got, _ = run(model, toks)
    assert switched == 0 and not fused_calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("hook", ["hook_pattern", "hook_attn_scores"])
def test_a_hook_on_scores_or_pattern_gets_transformer_lens_forward(hook, fused_calls):
    model = make_model()
    toks = tokens(model)
    seen = []

    def record(value, hook):
        seen.append(value.clone())

    want = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.1.attn.{hook}", record)])
    with fused_attention(model):
        got = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.1.attn.{hook}", record)])
    assert len(fused_calls) == 1  # block 0 fused; block 1, whose pattern is read, not
    assert len(seen) == 2 and seen[1].shape == (3, 4, 24, 24)
    # block 1's input went through the fused block 0, so equal within float error, not bit for bit
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_padding_mask_gets_transformer_lens_forward(fused_calls):
    model = make_model()
    toks = tokens(model)
    mask = torch.ones_like(toks)
    mask[0, :5] = 0  # left padding in the first row
    want = model(toks, attention_mask=mask)
    with fused_attention(model):
        got = model(toks, attention_mask=mask)
    assert not fused_calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forward_is_restored_on_exit_and_after_an_error():
    model = make_model()
    with fused_attention(model, enabled=False) as switched:
        assert switched == 0 and "forward" not in vars(model.blocks[0].attn)
    with pytest.raises(RuntimeError, match="inside"):
        with fused_attention(model) as switched:
            assert switched == 2 and "forward" in vars(model.blocks[0].attn)
            raise RuntimeError("inside")
    assert not any("forward" in vars(block.attn) for block in model.blocks)


def test_activation_source_fused_and_plain_agree_on_the_embedded_model(fused_calls):
    from bridge.activations import ActivationSource
    from bridge.model import load_model

    model = load_model("embedded")
    toks = torch.randint(0, model.cfg.d_vocab, (4, 64), generator=torch.Generator().manual_seed(2))
    got = {}
    for fused in (False, True):
        source = ActivationSource(model, ["blocks.1.attn.hook_z", "blocks.2.hook_resid_pre"], iter([]),
                                  batch_size=64, context_size=64, fused_attention=fused)
        got[fused] = source.model_activations(toks)
    assert len(fused_calls) == 2  # blocks 0 and 1 of the fused forward
    assert got[True].shape == (4 * 64, 128 + 128)
    torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-5)


def test_run_config_passes_fused_attention_on_and_rejects_non_booleans():
    from bridge.runner import RunConfig
    from jsae import ConfigError

    base = {"sae": {"architecture": "standard", "d_in": 128, "d_sae": 256}, "total_training_tokens": 4096}
    assert RunConfig.from_dict(base).fused_attention is True
    assert RunConfig.from_dict(base | {"fused_attention": False}).fused_attention is False
    with pytest.raises(ConfigError, match="fused_attention"):
        RunConfig.from_dict(base | {"fused_attention": "yes"})
