"""The fused forwards (blocks, attention, MLPs) equal TransformerLens' own, hooks included, and step aside when they must."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridge import fused_forward as ff
from bridge.fused_forward import covered, fused_forward

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
    "attention only, no normalisation": dict(attn_only=True, normalization_type=None),
    "parallel attention and MLP, hook_mlp_in": dict(parallel_attn_mlp=True, use_hook_mlp_in=True),
    "norm after attention and MLP, SoLU": dict(use_normalization_before_and_after=True, normalization_type="RMS",
                                                 act_fn="solu_ln"),
}
NOT_COVERED = {
    "alibi": dict(positional_embedding_type="alibi"),
    "soft-capped scores": dict(attn_scores_soft_cap=30.0),
    "local windows": dict(use_local_attn=True, attn_types=["local", "local"], window_size=5),
    "bidirectional": dict(attention_dir="bidirectional"),
    "per-head results": dict(use_attn_result=True),
}
CACHED = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k", "hook_resid_post", "hook_attn_out",
          "hook_resid_pre", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_pre", "hook_mid", "hook_post",
          "ln2.hook_scale", "ln2.hook_normalized", "ln_final.hook_scale")


def make_model(**overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**(BASE | overrides)))
    with torch.no_grad():  # visible biases and norm weights, so a wrongly placed one shows
        for name, param in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V", "b_in", "b_out", ".b")):
                param.normal_(0.0, 0.5)
            elif name.endswith(".w"):
                param.normal_(1.0, 0.5)
    return model.eval()


def norms(model):
    """How many LayerNorm / LayerNormPre modules `model` has (each gets the fused norm)."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    return sum(type(m) in (LayerNorm, LayerNormPre) for m in model.modules())


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
    with fused_forward(model) as switched:
        got_logits, got = run(model, toks)
    assert switched == sum(covered(m) for m in model.modules()) >= 2 * model.cfg.n_layers
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
    with fused_forward(model, enabled=False):  # MLPs and blocks stay covered: compare attention alone
        plain, _ = run(model, toks)
    with fused_forward(model) as switched:
        got, _ = run(model, toks)
    assert switched == 2 * model.cfg.n_layers + norms(model) and not fused_calls  # no attention
    torch.testing.assert_close(plain, want, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook", ["hook_pattern", "hook_attn_scores"])
def test_a_hook_on_scores_or_pattern_gets_transformer_lens_forward(hook, fused_calls):
    model = make_model()
    toks = tokens(model)
    seen = []

    def record(value, hook):
        seen.append(value.clone())

    want = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.1.attn.{hook}", record)])
    with fused_forward(model):
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
    with fused_forward(model):
        got = model(toks, attention_mask=mask)
    assert not fused_calls
    # the norms still run fused (float rounding); attention ignoring the mask would differ by far more
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_is_restored_on_exit_and_after_an_error():
    model = make_model()
    with fused_forward(model, enabled=False) as switched:
        assert switched == 0 and "forward" not in vars(model.blocks[0].attn)
    with pytest.raises(RuntimeError, match="inside"):
        with fused_forward(model) as switched:
            assert switched == 6 + 5 and "forward" in vars(model.blocks[0].attn)  # and 5 LayerNorms
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())


def test_activation_source_fused_and_plain_agree_on_the_embedded_model(fused_calls):
    from bridge.activations import ActivationSource
    from bridge.model import load_model

    model = load_model("embedded")
    toks = torch.randint(0, model.cfg.d_vocab, (4, 64), generator=torch.Generator().manual_seed(2))
    got = {}
    for fused in (False, True):
        source = ActivationSource(model, ["blocks.1.attn.hook_z", "blocks.2.hook_resid_pre"], iter([]),
                                  batch_size=64, context_size=64, fused_forward=fused)
        got[fused] = source.model_activations(toks)
    assert len(fused_calls) == 2  # blocks 0 and 1 of the fused forward
    assert got[True].shape == (4 * 64, 128 + 128)
    torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-5)


def test_run_config_passes_fused_forward_on_and_rejects_non_booleans():
    from bridge.runner import RunConfig
    from jsae import ConfigError

    base = {"sae": {"architecture": "standard", "d_in": 128, "d_sae": 256}, "total_training_tokens": 4096}
    assert RunConfig.from_dict(base).fused_forward is True
    assert RunConfig.from_dict(base | {"fused_forward": False}).fused_forward is False
    with pytest.raises(ConfigError, match="fused_forward"):
        RunConfig.from_dict(base | {"fused_forward": "yes"})


def test_a_block_normalises_once_and_projects_q_k_v_with_one_product(monkeypatch):
    from transformer_lens.components import Attention

    model = make_model()
    toks = tokens(model)
    ln_calls, separate = [], []
    for block in model.blocks:
        block.ln1.register_forward_hook(lambda module, args, out: ln_calls.append(module))
    plain_qkv = Attention.calculate_qkv_matrices
    monkeypatch.setattr(Attention, "calculate_qkv_matrices", lambda self, *a: separate.append(1) or plain_qkv(self, *a))
    with torch.no_grad():
        want = model(toks)
    assert len(ln_calls) == 3 * model.cfg.n_layers and len(separate) == model.cfg.n_layers
    ln_calls.clear(), separate.clear()
    with torch.no_grad(), fused_forward(model):
        got = model(toks)
    assert len(ln_calls) == model.cfg.n_layers and not separate
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_hook_inside_the_first_layernorm_gets_transformer_lens_block():
    model = make_model()
    toks = tokens(model)
    seen = []

    def record(value, hook):
        seen.append(value.clone())

    hooks = [("blocks.0.ln1.hook_scale", record)]
    with torch.no_grad():
        want = model.run_with_hooks(toks, fwd_hooks=hooks)
        with fused_forward(model):
            got = model.run_with_hooks(toks, fwd_hooks=hooks)
    assert len(seen) == 6  # three calls in each forward, as TransformerLens makes them
    torch.testing.assert_close(seen[3], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_fn, post_op", [("gelu", "gelu"), ("gelu_new", "gelu"), ("gelu_pytorch_tanh", "gelu"),
                                             ("relu", "relu"), ("silu", None)])
@pytest.mark.parametrize("normalization_type", ["LN", "LNPre"])
def test_activation_in_the_product_and_one_pass_norms_equal_transformer_lens(act_fn, post_op, normalization_type,
                                                                             monkeypatch):
    """With no hook on hook_pre or inside a norm, the MLP's activation runs as the first product's
    post-op (where oneDNN has it) and each norm as one F.layer_norm; the logits stay TransformerLens'."""
    model = make_model(act_fn=act_fn, normalization_type=normalization_type)
    toks = tokens(model)
    post_ops, layer_norms = [], []
    pointwise, layer_norm = torch.ops.mkldnn._linear_pointwise, F.layer_norm
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: post_ops.append(a[3]) or pointwise(*a), raising=False)
    monkeypatch.setattr(F, "layer_norm", lambda *a, **k: layer_norms.append(1) or layer_norm(*a, **k))
    with torch.no_grad():
        want = model(toks)
        post_ops.clear(), layer_norms.clear()
        with fused_forward(model):
            got = model(toks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(layer_norms) == 2 * model.cfg.n_layers + 1  # ln1 (once), ln2, ln_final
    if ff._ONEDNN:
        assert post_ops.count(post_op) == (model.cfg.n_layers if post_op else 0)
    seen = []
    with torch.no_grad(), fused_forward(model):  # a hook on the activation's input: the product, then the activation
        hooked = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.mlp.hook_pre", lambda v, hook: seen.append(v))])
    torch.testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5)
    assert len(seen) == 1


def test_a_layer_norm_under_autocast_or_in_another_dtype_gets_transformer_lens_norm():
    from transformer_lens.components import LayerNorm

    norm = make_model().blocks[0].ln2
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = LayerNorm.forward(norm, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_autocast = LayerNorm.forward(norm, x)
        with fused_forward(norm):
            got = norm(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got_autocast = norm(x)
            got_double = norm(x.double())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_autocast, want_autocast, rtol=0, atol=0)
    torch.testing.assert_close(got_double, LayerNorm.forward(norm, x.double()), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5, 7, 64), (33, 64)])
def test_linear_equals_torch_and_keeps_gradients(shape):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(48, 64, generator=generator)
    bias = torch.randn(48, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ff.linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ff.linear(x, weight.T.contiguous().T, None), x @ weight.T, rtol=1e-5, atol=1e-5)
    weight.requires_grad_(True)
    ff.linear(x, weight, bias).sum().backward()  # with gradients on, torch's product
    torch.testing.assert_close(weight.grad, x.reshape(-1, 64).sum(0).expand(48, 64), rtol=1e-5, atol=1e-4)
