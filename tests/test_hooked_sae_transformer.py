"""bridge.HookedSAETransformer with jsae SAEs against sae_lens' HookedSAETransformer, same weights,
on the embedded model; steering helpers against the hand computation; transcoders in the evals."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from saelens_helpers import TRANSCODERS, VARIANTS, make_saelens_sae, randomize_parameters, rel_err

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
sae_lens = pytest.importorskip("sae_lens")

RESID = "blocks.1.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
HOOK_Z = "blocks.0.attn.hook_z"
D = 128
TOL = 1e-4


@pytest.fixture(scope="module")
def base():
    from bridge.model import load_model

    return load_model("embedded")


@pytest.fixture(scope="module")
def model(base):
    from bridge import HookedSAETransformer

    return HookedSAETransformer.from_model(base)


@pytest.fixture(scope="module")
def ref(base):
    ref = sae_lens.HookedSAETransformer(copy.deepcopy(base.cfg), tokenizer=base.tokenizer)
    ref.load_state_dict(base.state_dict())
    return ref.eval()


@pytest.fixture(scope="module")
def tokens(base):
    rows = torch.randint(5, base.cfg.d_vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = base.tokenizer.bos_token_id
    return rows


@pytest.fixture(scope="module")
def clean_logits(base, tokens):
    with torch.no_grad():
        return base(tokens)


@pytest.fixture(autouse=True)
def _detached(model, ref):
    with torch.no_grad():
        yield
    model.reset_saes()
    ref.reset_saes()


def pair(tmp_path: Path, variant: str, *, hook: str = RESID, seed: int = 0):
    """(sae_lens SAE, the same weights loaded by jsae). Transcoders read MLP_IN and write MLP_OUT;
    "standard_hook_z" reads the attention heads' z."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    meta = {"hook_name": hook, "model_name": "embedded"}
    if variant == "standard_hook_z":
        ref_sae = make_saelens_sae("standard", d_in=D, d_sae=256, reshape_activations="hook_z", seed=seed,
                                   metadata=meta | {"hook_name": HOOK_Z})
    elif variant in TRANSCODERS:
        sae_cls, cfg_cls = get_sae_class(variant)
        cfg = cfg_cls(d_in=D, d_sae=256, d_out=D, dtype="float32", apply_b_dec_to_input=False)
        cfg.metadata = SAEMetadata(**meta | {"hook_name": MLP_IN, "hook_name_out": MLP_OUT})
        ref_sae = sae_cls(cfg)
        randomize_parameters(ref_sae, seed)
    else:
        ref_sae = make_saelens_sae(variant, d_in=D, d_sae=256, metadata=meta, seed=seed)
    with torch.no_grad():
        ref_sae.W_dec.mul_(0.05)
        ref_sae.W_enc.mul_(0.2)
    folder = tmp_path / f"{variant}-{seed}-{hook}"
    ref_sae.save_model(folder)
    return ref_sae, jsae.SAE.load_from_disk(folder)


def out_hook(sae) -> str:
    return sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name


SPLICED = ["standard", "gated", "jumprelu", "topk", "topk_rescaled", "standard_hook_z", "transcoder",
           "jumprelu_transcoder"]


@pytest.mark.parametrize("error", [False, True], ids=["recons", "error_term"])
@pytest.mark.parametrize("variant", SPLICED)
def test_cache_and_logits_match_saelens(tmp_path, model, ref, tokens, clean_logits, variant, error):
    ref_sae, sae = pair(tmp_path, variant)
    with torch.no_grad():
        want_logits, want = ref.run_with_cache_with_saes(tokens, saes=[ref_sae], use_error_term=error)
        got_logits, got = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=error)
    assert sorted(got.keys()) == sorted(want.keys())
    assert f"{out_hook(sae)}.hook_sae_acts_post" in got.keys()
    for name in want.keys():
        finite = torch.isfinite(want[name])  # attention scores hold -inf above the diagonal
        assert torch.equal(torch.isfinite(got[name]), finite), name
        assert rel_err(got[name][finite], want[name][finite]) <= TOL, name
    assert rel_err(got_logits, want_logits) <= TOL
    if error:
        assert rel_err(got_logits, clean_logits) <= 1e-5
    else:
        assert rel_err(got_logits, clean_logits) > 1e-3  # the SAE is really spliced in
    assert not model.acts_to_saes  # run_with_cache_with_saes detaches what it attached


def most_active_latent(model, sae, tokens) -> int:
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    return int(cache[f"{out_hook(sae)}.hook_sae_acts_post"].gt(0).sum((0, 1)).argmax())


@pytest.mark.parametrize("error", [False, True], ids=["recons", "error_term"])
@pytest.mark.parametrize("variant", ["standard", "topk", "jumprelu", "transcoder"])
def test_ablation_matches_saelens(tmp_path, model, ref, tokens, variant, error):
    from bridge.steering import ablate_latents

    ref_sae, sae = pair(tmp_path, variant)
    latent = most_active_latent(model, sae, tokens)
    point = f"{out_hook(sae)}.hook_sae_acts_post"

    def zero_in_place(acts, hook):
        acts[..., latent] = 0
        return acts

    outputs = {}

    def keep(name):
        return f"{out_hook(sae)}.hook_sae_output", lambda t, hook: outputs.__setitem__(name, t.clone())

    with torch.no_grad():
        ref.add_sae(ref_sae, use_error_term=error)
        want = ref.run_with_hooks(tokens, fwd_hooks=[(point, zero_in_place)])
        model.add_sae(sae, use_error_term=error)
        got = model.run_with_hooks_with_saes(tokens, fwd_hooks=[(point, zero_in_place), keep("manual")])
        helper = model.run_with_hooks_with_saes(tokens, fwd_hooks=[ablate_latents(sae, [latent]), keep("helper")])
        _, cache = model.run_with_cache(tokens)
    assert rel_err(got, want) <= TOL
    assert torch.equal(helper, got)
    assert rel_err(got, model(tokens)) > 1e-4  # the latent mattered
    if error:
        # the output moved by exactly the ablated latent's decoded contribution
        f = cache[point][..., latent, None]
        contribution = f * torch.from_numpy(np.asarray(sae.W_dec[latent]))
        torch.testing.assert_close(outputs["manual"], cache[f"{out_hook(sae)}.hook_sae_output"] - contribution,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gated", "topk_rescaled", "jumprelu_transcoder"])
def test_pre_activation_edit_matches_saelens(tmp_path, model, ref, tokens, variant):
    ref_sae, sae = pair(tmp_path, variant)
    latent = most_active_latent(model, sae, tokens)

    def boost(acts, hook):
        return acts + 2.0 * (torch.arange(acts.shape[-1]) == latent)

    point = f"{out_hook(sae)}.hook_sae_acts_pre"
    want = ref.run_with_hooks_with_saes(tokens, saes=[ref_sae], fwd_hooks=[(point, boost)])
    got = model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(point, boost)])
    assert rel_err(got, want) <= TOL
    assert rel_err(got, model.run_with_saes(tokens, saes=[sae])) > 1e-4


def test_steering_helpers_equal_the_hand_computation(tmp_path, base, model, tokens, clean_logits):
    from bridge.steering import add_decoder_direction, clamp_latent, scale_latent

    _, sae = pair(tmp_path, "standard")
    latent, coefficient = most_active_latent(model, sae, tokens), 3.0
    positions = torch.zeros(tokens.shape, dtype=torch.bool)
    positions[:, 6:] = True
    W = torch.from_numpy(np.asarray(sae.W_dec))
    point = f"{RESID}.hook_sae_acts_post"
    with torch.no_grad():
        model.add_sae(sae, use_error_term=True)
        steered = model.run_with_hooks_with_saes(
            tokens, fwd_hooks=[add_decoder_direction(sae, latent, coefficient, positions=positions)])
        _, clean = model.run_with_cache(tokens)
        edits = {}
        for name, hook in (("clamp", clamp_latent(sae, latent, 5.0, positions=positions)),
                           ("scale", scale_latent(RESID, latent, -2.0))):
            with model.hooks(fwd_hooks=[hook]):
                _, edits[name] = model.run_with_cache(tokens)
        model.reset_saes()
        by_hand = base.run_with_hooks(
            tokens, fwd_hooks=[(RESID, lambda acts, hook: acts + coefficient * W[latent] * positions[..., None])])
    assert rel_err(steered, by_hand) <= TOL
    assert rel_err(steered, clean_logits) > 1e-3
    f = clean[point][..., latent]
    clamped = edits["clamp"][point][..., latent]
    assert torch.equal(clamped[positions], torch.full_like(f[positions], 5.0))
    assert torch.equal(clamped[~positions], f[~positions])
    torch.testing.assert_close(edits["scale"][point][..., latent], -2.0 * f)
    # other latents are untouched, and the output moves by the edit times the decoder row
    others = torch.arange(sae.cfg.d_sae) != latent
    assert torch.equal(edits["clamp"][point][..., others], clean[point][..., others])
    moved = edits["clamp"][f"{RESID}.hook_sae_output"] - clean[f"{RESID}.hook_sae_output"]
    torch.testing.assert_close(moved, (clamped - f)[..., None] * W[latent], rtol=1e-4, atol=1e-5)


def test_attach_reset_and_two_saes(tmp_path, base, model, ref, tokens):
    ref_std, std = pair(tmp_path, "standard", hook="blocks.0.hook_resid_post")
    ref_tc, tc = pair(tmp_path, "transcoder")
    hooks_before = set(model.hook_dict)
    with torch.no_grad():
        clean = model(tokens)
        model.add_sae(std)
        model.add_sae(tc)
        assert set(model.acts_to_saes) == {"blocks.0.hook_resid_post", MLP_IN}
        assert torch.equal(base(tokens), clean)  # from_model's copy leaves the wrapped model alone
        both = model(tokens)
        ref.add_sae(ref_std)
        ref.add_sae(ref_tc)
        want = ref(tokens)
        assert rel_err(both, want) <= TOL and rel_err(both, clean) > 1e-3
        model.reset_saes("blocks.0.hook_resid_post")
        ref.reset_saes("blocks.0.hook_resid_post")
        assert rel_err(model(tokens), ref(tokens)) <= TOL
        model.reset_saes()
        assert torch.equal(model(tokens), clean)
        assert set(model.hook_dict) == hooks_before
        # saes() puts back the SAE that was attached before, with its settings
        model.add_sae(std, use_error_term=True)
        _, other = pair(tmp_path, "topk", hook="blocks.0.hook_resid_post", seed=1)
        with model.saes([other]):
            assert model.acts_to_saes["blocks.0.hook_resid_post"] is other
        assert model.acts_to_saes["blocks.0.hook_resid_post"] is std
        assert model._acts_to_saes["blocks.0.hook_resid_post"].use_error_term
        model.reset_saes()
        assert torch.equal(model(tokens), clean)


def test_exclude_special_tokens_matches_saelens(tmp_path, model, ref, tokens):
    ref_sae, sae = pair(tmp_path, "standard")
    with torch.no_grad():
        want = ref.run_with_saes(tokens, saes=[ref_sae], exclude_special_tokens=True)
        got = model.run_with_saes(tokens, saes=[sae], exclude_special_tokens=True)
        clean = model(tokens)
        spliced = model.run_with_saes(tokens, saes=[sae])
    assert rel_err(got, want) <= TOL
    torch.testing.assert_close(got[:, 0], clean[:, 0])  # BOS kept its own activation
    assert rel_err(got[:, 0], spliced[:, 0]) > 1e-3


def test_errors(tmp_path, model, tokens):
    from jsae import ConfigError, InputError

    _, sae = pair(tmp_path, "standard")
    missing = sae.replace(cfg=sae.cfg.replace(metadata=sae.cfg.metadata.replace(hook_name="blocks.1.hook_resid_pots")))
    with pytest.raises(ConfigError, match="blocks.1.hook_resid_post"):
        model.add_sae(missing)
    with pytest.raises(InputError, match="gradients"):
        model.run_with_hooks_with_saes(tokens, saes=[sae], bwd_hooks=[(f"{RESID}.hook_sae_acts_post", lambda g, hook: g)])
    assert not model.acts_to_saes


@pytest.mark.parametrize("first_attached_first", [True, False])
def test_a_transcoder_reads_what_another_writes(model, tokens, first_attached_first):
    def transcoder(read, write, seed):
        meta = jsae.Metadata(hook_name=read, hook_name_out=write)
        return jsae.SAE.from_config(jsae.TranscoderConfig(d_in=D, d_sae=64, d_out=D, metadata=meta), seed=seed)

    first, second = transcoder(MLP_IN, MLP_OUT, 0), transcoder(MLP_OUT, RESID, 1)
    for attached in ([first, second] if first_attached_first else [second, first]):
        model.add_sae(attached)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache[f"{RESID}.hook_sae_input"], cache[f"{MLP_OUT}.hook_sae_output"])
    model.reset_saes(MLP_IN)  # the second reads the model's own MLP output again
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache[f"{RESID}.hook_sae_input"], cache[MLP_OUT])
    # an SAE at a transcoder's input hook replaces it: both are keyed by the hook they read (as in SAELens)
    model.add_sae(first)
    model.add_sae(jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=D, d_sae=64, metadata=jsae.Metadata(hook_name=MLP_IN))))
    assert model.acts_to_saes[MLP_IN].cfg.architecture == "standard"
    assert MLP_OUT in model.hook_dict


def test_a_failed_add_keeps_the_attached_sae(tmp_path, model):
    from jsae import ConfigError

    _, sae = pair(tmp_path, "standard")
    model.add_sae(sae)
    meta = sae.cfg.metadata.replace(hook_name_out="blocks.9.hook_mlp_out")
    with pytest.raises(ConfigError, match="hook_name_out"):
        model.add_sae(sae.replace(cfg=sae.cfg.replace(metadata=meta)))
    assert model.acts_to_saes[RESID] is sae


def test_constructor_and_no_gradient_through_the_sae(tmp_path, base, tokens):
    from bridge import HookedSAETransformer

    tiny = HookedSAETransformer({"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32, "n_ctx": 8,
                                 "d_vocab": 50, "act_fn": "relu"})
    assert "blocks.0.mlp.hook_in" in tiny.hook_dict
    cfg = jsae.StandardSAEConfig(d_in=16, d_sae=32, metadata=jsae.Metadata(hook_name="blocks.0.hook_resid_pre"))
    sae = jsae.SAE.from_config(cfg)
    rows = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        logits = tiny.run_with_saes(rows, saes=[sae])
        logits.sum().backward()
    # the unembedding after the SAE gets a gradient; the embedding before it none
    assert tiny.W_U.grad is not None and tiny.W_E.grad is None


@pytest.mark.parametrize("variant", ["transcoder", "skip_transcoder"])
def test_transcoder_in_the_evals_reads_hook_name_and_writes_hook_name_out(tmp_path, base, tokens, variant):
    from bridge.evals import recons_loss, sparsity_and_variance_metrics

    ref_tc, tc = pair(tmp_path, variant)
    if variant == "skip_transcoder":
        ref_tc.W_skip.mul_(0.1)
        ref_tc.save_model(tmp_path / "skip")
        tc = jsae.SAE.load_from_disk(tmp_path / "skip")
    got = recons_loss(base, tc, tokens)
    seen = {}

    def read(resid_mid, hook):
        seen["x"] = base.blocks[1].ln2(resid_mid)  # the MLP's input

    _, ce = base.run_with_hooks(tokens, return_type="both", loss_per_token=True, fwd_hooks=[
        ("blocks.1.hook_resid_mid", read), (MLP_OUT, lambda out, hook: ref_tc(seen["x"]))])
    _, zero_ce = base.run_with_hooks(tokens, return_type="both", loss_per_token=True,
                                     fwd_hooks=[(MLP_OUT, lambda out, hook: torch.zeros_like(out))])
    _, cache = base.run_with_cache(tokens)
    torch.testing.assert_close(got["ce_loss_with_sae"], ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["ce_loss_with_ablation"], zero_ce, rtol=1e-4, atol=1e-5)
    assert (got["ce_loss_with_sae"] - got["ce_loss_without_sae"]).abs().max() > 1e-3
    metrics, _ = sparsity_and_variance_metrics(base, tc, [tokens])
    x_hat = ref_tc(base.blocks[1].ln2(cache["blocks.1.hook_resid_mid"])).reshape(-1, D).double()
    target = cache[MLP_OUT].reshape(-1, D).double()
    mse = ((target - x_hat) ** 2).sum(-1).mean()
    variance = (target**2).sum(-1).mean() - (target.mean(0) ** 2).sum()
    assert metrics["explained_variance"] == pytest.approx(float(1 - mse / variance), rel=1e-4)


def test_encoder_split_equals_encode():
    """Every split composes to the module's latents: for the SAELens variants on sae_lens' weights,
    for jsae's own architectures on random ones."""
    from jsae.saes import get_architecture
    from jsae.saes._hook_split import SPLITS, encoder_split

    x = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    saes = []
    for variant in VARIANTS:
        ref_sae = make_saelens_sae(variant)
        params = {k: np.asarray(v.detach()) for k, v in ref_sae.state_dict().items()}
        saes.append(jsae.SAE(jsae.io.config_from_dict(ref_sae.cfg.to_dict()), params))
    for name, extra in (("abstopk", {}), ("topk_transcoder", {"d_out": 10}), ("topk_skip_transcoder", {"d_out": 10})):
        for rescale in (False, True):
            cfg = get_architecture(name).config_cls(d_in=16, d_sae=48, k=6, rescale_acts_by_decoder_norm=rescale, **extra)
            sae = jsae.SAE.from_config(cfg, seed=1)
            saes.append(sae.replace(params=sae.params | {"b_enc": jnp.linspace(-0.5, 0.5, 48)}))
    cfg = get_architecture("jumprelu_skip_transcoder").config_cls(d_in=16, d_sae=48, d_out=10)
    sae = jsae.SAE.from_config(cfg, seed=1)
    saes.append(sae.replace(params=sae.params | {"threshold": jnp.linspace(0.0, 0.6, 48)}))
    assert {sae.cfg.architecture for sae in saes} == set(SPLITS)
    for sae in saes:
        split = encoder_split(sae.cfg.architecture)
        sae_in, _ = sae.apply("prepare_input", x)
        hidden_pre = split.pre_activations(sae.params, sae.cfg, sae_in)
        np.testing.assert_array_equal(split.activate(sae.params, sae.cfg, hidden_pre, sae_in), sae.encode(x),
                                      err_msg=sae.cfg.architecture)


def docs_python_blocks(*sections: str) -> list[str]:
    text = (Path(__file__).parents[1] / "docs" / "analysis.md").read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    return [block for section in sections for part in parts if part.startswith(section)
            for block in re.findall(r"```python\n(.*?)```", part, flags=re.S)]


def test_docs_examples_run():
    """The basic example (load, attach, run with the cache, read latents), then the page's others."""
    scope: dict = {}
    for block in docs_python_blocks("Basic usage"):
        exec(compile(block, "docs/analysis.md", "exec"), scope)
    latents, sae = scope["latents"], scope["sae"]
    assert latents.shape == (*scope["tokens"].shape, sae.cfg.d_sae)
    assert int((latents > 0).sum(-1).max()) <= sae.cfg.k
    assert not scope["model"].acts_to_saes
    blocks = docs_python_blocks("Attaching", "Ablation and steering", "Transcoders")
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "docs/analysis.md", "exec"), scope)
    assert not torch.equal(scope["steered"], scope["ablated"])
    assert scope["latents"].shape[-1] == scope["transcoder"].cfg.d_sae
    assert not scope["model"].acts_to_saes
