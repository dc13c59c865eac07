"""model_class_name: AutoModelForCausalLM: any transformers causal LM, hooked by module path as sae_lens'
HookedProxyLM hooks it. Tiny random models of four families, saved to folders with the embedded
model's tokenizer (no download)."""

from __future__ import annotations

import pytest
import torch

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

VOCAB = 4096  # the embedded tokenizer's
# family -> (config class, its tiny sizes, a decoder layer's module path)
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
              "model.layers.0"),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8), "model.layers.0"),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
              "model.layers.0"),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
                 "gpt_neox.layers.0"),
}


def save_tiny_model(folder, family: str, seed: int = 0):
    """A 2-layer random model of `family` and the embedded tokenizer, saved to `folder`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bridge.embedded import EMBEDDED_DIR

    config_class, sizes, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=0, **sizes)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(EMBEDDED_DIR).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: save_tiny_model(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def load(folder, **kwargs):
    from bridge.model import load_model

    return load_model(folder, model_class_name="AutoModelForCausalLM", device="cpu", **kwargs)


def hidden_state(model, tokens, layer: int) -> torch.Tensor:
    """The output of decoder layer `layer` as the model itself reports it (output_hidden_states)."""
    with torch.no_grad():
        return model.model(tokens, output_hidden_states=True).hidden_states[layer + 1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activations_equal_the_models_hidden_states(folders, family):
    from bridge.activations import ActivationSource

    model = load(folders[family])
    hook = FAMILIES[family][2]
    tokens = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    source = ActivationSource(model, hook, iter([]), batch_size=8, context_size=16, as_jax=False)
    got = source.model_activations(tokens)
    want = hidden_state(model, tokens, 0).reshape(-1, model.cfg.d_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_stops_after_the_last_hook_and_leaves_no_hooks(folders):
    from bridge.activations import ActivationSource

    model = load(folders["llama"])
    ran = []
    handle = model.hook_dict["model.layers.1"].register_forward_hook(lambda *a: ran.append(1))
    source = ActivationSource(model, ["model.layers.0.self_attn", "model.layers.0"], iter([]), batch_size=8,
                              context_size=8, as_jax=False)
    tokens = torch.randint(1, VOCAB, (2, 8))
    acts = source.model_activations(tokens)
    assert acts.shape == (16, 64) and ran == []  # layer 1 never ran
    handle.remove()
    seen = {}  # the attention module returns a tuple: its first element is the activation
    handle = model.hook_dict["model.layers.0.self_attn"].register_forward_hook(
        lambda module, args, output: seen.setdefault("attn", output[0]))
    with torch.no_grad():
        model.model(tokens)
    handle.remove()
    assert isinstance(seen["attn"], torch.Tensor)
    torch.testing.assert_close(acts[:, :32], seen["attn"].reshape(16, 32))
    assert all(not m._forward_hooks for m in model.modules())
    model(torch.randint(1, VOCAB, (1, 8)))
    assert ran == []  # the handle was removed; the model's own forward runs to the end without hooks
    assert model(torch.randint(1, VOCAB, (1, 8))).shape == (1, 8, VOCAB)


def test_activations_and_token_rows_equal_saelens_hooked_proxy_lm(folders):
    """The same model and tokens through sae_lens' HookedProxyLM (its run_with_cache, its ActivationsStore)."""
    import datasets
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.training.activations_store import ActivationsStore
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bridge.activations import ActivationSource
    from bridge.data import token_rows
    from bridge.run_config import RunConfig

    folder, hook = folders["qwen2"], "model.layers.1.mlp"
    ours = load(folder)
    theirs = HookedProxyLM(AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
                           hook_names=[hook])
    docs = ["def add(a, b):\n    return a + b\n" * 3, "The quick brown fox. " * 9, "import os\n" * 7] * 4
    store = ActivationsStore(model=theirs, dataset=datasets.Dataset.from_dict({"text": docs}), streaming=False,
                             hook_name=hook, hook_head_index=None, context_size=24, d_in=32, n_batches_in_buffer=2,
                             total_training_tokens=10**5, store_batch_size_prompts=4, train_batch_size_tokens=32,
                             prepend_bos=True, normalize_activations="none", device="cpu", dtype="float32")
    want_rows = store.get_batch_tokens(6)
    cfg = RunConfig(model_name=folder, model_class_name="AutoModelForCausalLM", hook_name=hook, context_size=24,
                    dataset_path="unused")
    import bridge.data

    original = bridge.data.text_documents
    bridge.data.text_documents = lambda cfg, split=None: iter(docs)
    try:
        rows = token_rows(cfg, ours, cycle=False)
        got_rows = [next(rows) for _ in range(6)]
    finally:
        bridge.data.text_documents = original
    assert got_rows == want_rows.tolist()
    with torch.no_grad():
        _, cache = theirs.run_with_cache(want_rows, names_filter=[hook])
    source = ActivationSource(ours, hook, iter([]), batch_size=8, context_size=24, as_jax=False)
    got = source.model_activations(want_rows)
    torch.testing.assert_close(got, cache[hook].reshape(-1, 32), rtol=1e-5, atol=1e-5)


def _train(folder, family, tmp_path, **changes):
    from bridge.run import run
    from bridge.run_config import RunConfig

    data = {"model_name": folder, "model_class_name": "AutoModelForCausalLM", "hook_name": FAMILIES[family][2],
            "dataset_path": "stdlib", "context_size": 32, "store_batch_size_prompts": 8, "n_batches_in_buffer": 2,
            "n_eval_batches": 0, "sae": {"architecture": "topk", "d_in": 32, "d_sae": 64, "k": 4},
            "total_training_tokens": 2048, "train_batch_size_tokens": 256, "lr_decay_steps": 0,
            "checkpoint_path": None, "progress_bar": False, "output_path": str(tmp_path / family)} | changes
    return run(RunConfig.from_dict(data))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_on_each_family_and_the_folder_loads_in_saelens(folders, family, tmp_path):
    import sae_lens

    sae, _ = _train(folders[family], family, tmp_path)
    out = tmp_path / family
    ref = sae_lens.SAE.load_from_disk(str(out))
    assert ref.cfg.metadata.model_class_name == "AutoModelForCausalLM"
    assert ref.cfg.metadata.hook_name == FAMILIES[family][2] and ref.cfg.metadata.model_name == folders[family]
    assert sae.cfg.d_in == ref.cfg.d_in == 32
    x = torch.randn(5, 32)
    import numpy as np

    torch.testing.assert_close(ref(x).detach(), torch.as_tensor(np.asarray(sae(x.numpy()))), rtol=1e-4, atol=1e-5)


def test_evals_splice_the_sae_into_the_module(folders, tmp_path):
    """CE and KL with the SAE spliced in equal a forward whose module output is replaced, by a plain torch hook,
    with sae_lens' reconstruction of the same SAE folder; jsae eval runs on the folder from its metadata."""
    import sae_lens
    from transformer_lens.utils import lm_cross_entropy_loss

    from bridge.cli import main
    from bridge.evals import recons_loss

    family = "gpt_neox"
    folder, hook = folders[family], FAMILIES[family][2]
    metadata = jsae.Metadata(model_name=folder, model_class_name="AutoModelForCausalLM", hook_name=hook,
                             context_size=32, dataset_path="stdlib", prepend_bos=True)
    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=32, d_sae=64, k=8, metadata=metadata), seed=1)
    sae.save_model(tmp_path / "sae")
    ref = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    model = load(folder)
    tokens = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    got = recons_loss(model, sae, tokens, hook_name=hook)

    def replace(module, args, output):
        return ref(output).detach()

    with torch.no_grad():
        clean = model.model(tokens).logits
        handle = model.hook_dict[hook].register_forward_hook(replace)
        spliced = model.model(tokens).logits
        handle.remove()
    torch.testing.assert_close(got["ce_loss_with_sae"], lm_cross_entropy_loss(spliced, tokens, per_token=True),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["ce_loss_without_sae"], lm_cross_entropy_loss(clean, tokens, per_token=True))
    kl = torch.nn.functional.kl_div(spliced.log_softmax(-1), clean.softmax(-1), reduction="none").sum(-1)
    torch.testing.assert_close(got["kl_div_with_sae"], kl, rtol=1e-3, atol=1e-5)
    assert float(kl.mean()) > 1e-4  # the SAE changes the model's output: the comparison is not of zeros
    assert float(got["ce_loss_with_ablation"].mean()) != float(got["ce_loss_without_sae"].mean())

    assert main(["eval", str(tmp_path / "sae"), "--batches", "1", "--batch-size", "2", "--device", "cpu",
                 "--json"]) == 0


def test_model_from_pretrained_kwargs_and_bad_names(folders, tmp_path):
    model = load(folders["llama"], from_pretrained_kwargs={"dtype": "bfloat16"})
    assert next(model.model.parameters()).dtype == torch.bfloat16
    model = load(folders["llama"], from_pretrained_kwargs={"torch_dtype": "float32", "revision": "main"})
    assert next(model.model.parameters()).dtype == torch.float32
    from bridge.model import check_hook, hook_width

    assert hook_width(model, "model.layers.1.self_attn") == 32  # a tuple output: its first element
    with pytest.raises(jsae.ConfigError, match=r"'model.layer.0' is not a module.*Did you mean 'model.layers.0'"):
        check_hook(model, "model.layer.0")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.model.parameters()) > 0
    with pytest.raises(jsae.MissingFileError, match="no such folder"):
        load(str(tmp_path / "absent"))
    with pytest.raises(jsae.ConfigError, match="model_class_name: expected"):
        from bridge.model import load_model

        load_model(folders["llama"], model_class_name="HookedMamba")


def test_train_dry_run_and_plan_on_a_hugging_face_model(folders, tmp_path, capsys):
    from bridge.cli import main

    config = tmp_path / "hf.yaml"
    config.write_text(f"model_name: {folders['gemma2']}\nmodel_class_name: AutoModelForCausalLM\n"
                      "hook_name: model.layers.1.mlp\ncontext_size: 32\nsae: {architecture: topk, d_in: 32, "
                      "d_sae: 64, k: 4}\ntotal_training_tokens: 4096\ntrain_batch_size_tokens: 256\n")
    assert main(["train", str(config), "--dry-run", "--output-path", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "hook model.layers.1.mlp (width 32 = sae.d_in)" in printed and "dry run: every check passed" in printed
    assert main(["train", str(config), "--dry-run", "--set", "hook_name=model.layers.1.mlpp"]) == 2
    assert "Did you mean 'model.layers.1.mlp'" in capsys.readouterr().err
