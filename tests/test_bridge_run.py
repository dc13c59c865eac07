"""`jsae train` end to end on the embedded model; the activation cache; the seed example; bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SMALL = ["--set", "total_training_tokens=98304", "--set", "train_batch_size_tokens=2048", "--set", "sae.d_sae=256",
         "--set", "sae.k=16", "--set", "lr_decay_steps=8", "--set", "n_batches_in_buffer=4",
         "--set", "checkpoint_every_n_steps=0", "--set", "progress_bar=false"]


@pytest.fixture(scope="module")
def model():
    from bridge.model import load_model

    return load_model("embedded")


def small_cfg(tmp_path, **changes):
    from bridge.runner import DEFAULT_CONFIG, RunConfig

    data = {"total_training_tokens": 98304, "train_batch_size_tokens": 2048, "lr_decay_steps": 8,
            "n_batches_in_buffer": 4, "checkpoint_path": None, "progress_bar": False,
            "output_path": str(tmp_path / "sae"), "sae": {"d_sae": 256, "k": 16}}
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = data.get(key, {}) | value
        else:
            data[key] = value
    return RunConfig.from_yaml(DEFAULT_CONFIG, data)


@pytest.mark.slow
def test_cli_train_writes_a_folder_sae_lens_opens(tmp_path, capsys):
    import sae_lens

    from bridge.cli import main

    out = tmp_path / "sae"
    assert main(["train", "--output-path", str(out), "--set", f"checkpoint_path={tmp_path / 'ckpt'}", *SMALL,
                 "--set", "eval_every_n_steps=20", "--set", "n_eval_batches=2", "--json"]) == 0
    printed = capsys.readouterr().out
    assert "L0" in printed and "explained variance" in printed and "dead features" in printed
    assert "CE loss score" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["l0"] == pytest.approx(16, abs=0.5)
    assert summary["explained_variance"] > 0.25  # an untrained SAE scores below 0
    assert 0.5 < summary["ce_loss_score"] <= 1.0
    ref = sae_lens.SAE.load_from_disk(str(out))
    assert ref.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert ref.cfg.metadata.model_name == "embedded"
    assert ref.cfg.metadata.context_size == 128 and ref.cfg.metadata.prepend_bos is True
    # the default run's folder says what ran: the plan the command printed as its second line
    executed = json.loads((out / "cfg.json").read_text())["metadata"]["jsae_execution"]
    assert executed["platform"] == "cpu" and executed["topk"] in ("dense", "sparse") and executed["optimizer"]
    import jsae

    assert printed.splitlines()[1] == "plan: " + jsae.backends.ExecutionPlan(**{
        **executed, "compiler_options": tuple(sorted(executed["compiler_options"].items()))}).describe()
    assert (out / "metrics.jsonl").exists() and (out / "sparsity.safetensors").exists()
    # evals ran during training (steps 20, 40) and at the end (48), and the final ones are in the metadata
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/ce_loss_score" in r] == [20, 40, 48]
    final = ref.cfg.metadata.eval_metrics
    assert final["ce_loss_score"] == pytest.approx(summary["ce_loss_score"])
    assert final["total_tokens_eval_reconstruction"] == 2 * 32 * 128
    assert set(final) >= {"kl_div_score", "explained_variance", "l0", "l2_ratio", "relative_reconstruction_bias"}
    from test_plots import assert_drawn_png

    assert sorted(summary["plots"]) == sorted(str(out / n) for n in ("feature_density.png", "training_curves.png"))
    for name in summary["plots"]:
        assert_drawn_png(name)


@pytest.mark.slow
def test_cache_trains_to_the_same_parameters_as_live(tmp_path, model):
    from bridge.cache import write_cache
    from bridge.runner import prepare, run

    cfg = small_cfg(tmp_path)
    live, _ = run(cfg)
    _, prepared = prepare(cfg)
    write_cache(prepared, model, tmp_path / "cache", n_tokens=cfg.train.total_training_tokens + 40000)
    cached_cfg = small_cfg(tmp_path, activation_cache_path=str(tmp_path / "cache"), output_path=str(tmp_path / "c"))
    from_cache, _ = run(cached_cfg)
    for name, value in live.params.items():
        np.testing.assert_array_equal(np.asarray(from_cache.params[name]), np.asarray(value), err_msg=name)


def test_killed_caching_run_leaves_nothing_that_loads(tmp_path, model, monkeypatch):
    from bridge import activations
    from bridge.cache import CachedActivations, write_cache
    from bridge.runner import prepare

    _, cfg = prepare(small_cfg(tmp_path))
    calls = {"n": 0}
    original = activations.ActivationSource.model_activations

    def dying(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C in the middle of caching looks like
        return original(self, tokens)

    monkeypatch.setattr(activations.ActivationSource, "model_activations", dying)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg, model, tmp_path / "cache", n_tokens=10**6, shard_tokens=4096)
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob(".cache.tmp-*"))
    # a folder whose writer died before finishing (no cache.json) is refused
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard_00000.safetensors").write_bytes(b"xx")
    with pytest.raises(jsae.FormatError, match="not a finished jsae activation cache"):
        CachedActivations(tmp_path / "half", cfg.hook_name, 2048)


def test_seed_basic_usage_example_on_the_embedded_model(model, tmp_path):
    """The SAELens README's basic usage, with the SAE side from jsae."""
    from bridge import torch_to_jax

    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=128, d_sae=512, k=8), seed=1)
    sae.save_model(tmp_path / "s")
    sae = jsae.SAE.load_from_disk(tmp_path / "s")
    tokens = model.to_tokens("def hello(world):\n    return world")
    _, cache = model.run_with_cache(tokens)
    activations = cache["resid_pre", 2]
    features = sae.encode(torch_to_jax(activations))
    reconstructed = sae.decode(features)
    assert features.shape == (1, tokens.shape[1], 512)
    assert reconstructed.shape == tuple(activations.shape)
    assert int((np.asarray(features) > 0).sum(-1).max()) <= 8


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"hook_name": "blocks.2.hook_resid_pr"}, r"'blocks\.2\.hook_resid_pr' is not a hook point.*Did you mean 'blocks\.2\.hook_resid_pre'"),
    ({"sae": {"d_in": 64}}, r"sae\.d_in=64 contradicts the width of 'blocks\.2\.hook_resid_pre'.*which is 128"),
    ({"context_size": 256}, r"context_size=256 is larger than the model's n_ctx=128"),
])
def test_bad_run_configs(tmp_path, changes, pattern):
    from bridge.runner import prepare

    with pytest.raises(jsae.ConfigError, match=pattern):
        prepare(small_cfg(tmp_path, **changes))


def test_unknown_config_key_suggests_the_close_one(tmp_path):
    from bridge.runner import DEFAULT_CONFIG, RunConfig

    with pytest.raises(jsae.ConfigError, match=r"unknown key 'contxt_size'.*Did you mean 'context_size'"):
        RunConfig.from_yaml(DEFAULT_CONFIG, {"contxt_size": 64})
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_CONFIG.read_text() + "\nhook_nam: x\n")
    with pytest.raises(jsae.ConfigError, match=r"bad\.yaml: unknown key 'hook_nam'.*Did you mean 'hook_name'"):
        RunConfig.from_yaml(bad)


def test_empty_dataset(tmp_path, model):
    from bridge.runner import token_rows

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    cfg = small_cfg(tmp_path, dataset_path=str(empty))
    with pytest.raises(jsae.InputError, match="gave no row|is empty"):
        next(token_rows(cfg, model))
    (tmp_path / "none").mkdir()
    with pytest.raises(jsae.InputError, match="holds no .txt"):
        next(token_rows(small_cfg(tmp_path, dataset_path=str(tmp_path / "none")), model))


def test_tokenizer_without_bos_while_prepend_bos(tmp_path, model):
    from bridge.runner import token_rows

    class NoBos:
        tokenizer = type("T", (), {"bos_token_id": None, "eos_token_id": 0, "sep_token_id": None})()

    with pytest.raises(jsae.ConfigError, match="prepend_bos is true, but the model's tokenizer has no BOS token"):
        next(token_rows(small_cfg(tmp_path), NoBos()))


def test_pretokenized_rows_and_text_files(tmp_path, model):
    from bridge.runner import token_rows

    rows = np.arange(3 * 40).reshape(3, 40) % 4000
    np.save(tmp_path / "rows.npy", rows)
    got = token_rows(small_cfg(tmp_path, dataset_path=str(tmp_path / "rows.npy"), context_size=32), model, cycle=False)
    assert [list(r) for r in got] == [list(r[:32]) for r in rows.tolist()]
    (tmp_path / "doc.txt").write_text("hello world " * 200)
    row = next(token_rows(small_cfg(tmp_path, dataset_path=str(tmp_path / "doc.txt")), model))
    assert len(row) == 128 and row[0] == model.tokenizer.bos_token_id
    shutil.rmtree(tmp_path / "sae", ignore_errors=True)
    assert torch.is_tensor(model.to_tokens("x"))


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    from bridge.runner import RunConfig

    cfg = RunConfig.from_yaml(path)
    assert cfg.train.total_training_steps > cfg.train.lr_warm_up_steps + cfg.train.lr_decay_steps


def test_local_hugging_face_gpt2_folder_is_converted_offline(tmp_path):
    """A GPT-2-style checkpoint on disk loads as a HookedTransformer with the same logits."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from bridge.embedded import EMBEDDED_DIR
    from bridge.model import load_model

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    hf.eval()
    hf.save_pretrained(tmp_path / "gpt2ish")
    AutoTokenizer.from_pretrained(EMBEDDED_DIR).save_pretrained(tmp_path / "gpt2ish")
    model = load_model(str(tmp_path / "gpt2ish"))
    tokens = torch.randint(0, 4096, (2, 16))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.tokenizer is not None and model.cfg.n_ctx == 64


def test_jsonl_dataset_through_hugging_face_datasets(tmp_path, model):
    from bridge.runner import token_rows

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} " * 30}) for i in range(5)))
    rows = list(token_rows(small_cfg(tmp_path, dataset_path=str(path), context_size=32), model, cycle=False))
    assert rows and all(len(r) == 32 and r[0] == model.tokenizer.bos_token_id for r in rows)
    want = model.to_tokens("line 0 " * 30, prepend_bos=False)[0].tolist()
    assert rows[0][1:32] == want[:31]


@pytest.mark.slow
def test_two_hooks_in_one_run_equal_two_separate_runs(tmp_path):
    from bridge.runner import run

    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"]
    common = {"total_training_tokens": 20480, "n_eval_batches": 1, "eval_batch_size_prompts": 8}
    saes, summary = run(small_cfg(tmp_path, hook_names=hooks, output_path=str(tmp_path / "both"), **common))
    assert [s.cfg.metadata.hook_name for s in saes] == hooks
    for hook, sae in zip(hooks, saes, strict=True):
        alone, _ = run(small_cfg(tmp_path, hook_name=hook, output_path=str(tmp_path / hook), **common))
        saved = jsae.SAE.load_from_disk(tmp_path / "both" / hook)
        np.testing.assert_array_equal(np.asarray(saved.params["W_enc"]), np.asarray(sae.params["W_enc"]))
        for name, value in alone.params.items():
            a, b = np.asarray(saved.params[name], np.float64), np.asarray(value, np.float64)
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), (hook, name)
        assert saved.cfg.metadata.hook_name == hook
    table = (tmp_path / "both" / "summary.md").read_text()
    assert all(hook in table for hook in hooks) and "CE loss score" in table
    assert [row["name"] for row in summary["saes"]] == hooks


@pytest.mark.slow
def test_sweep_run_writes_a_folder_per_sae_and_a_summary(tmp_path, capsys):
    import sae_lens

    from bridge.cli import main

    out = tmp_path / "sweep"
    assert main(["train", "--output-path", str(out), *SMALL, "--set", "total_training_tokens=20480",
                 "--set", "n_eval_batches=1", "--set", "sweep={sae.k: [8, 16], lr: [0.001, 0.003]}",
                 "--set", "checkpoint_path=null", "--json"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert [row["name"] for row in summary["saes"]] == ["k=8_lr=0.001", "k=16_lr=0.003"]
    for row, k in zip(summary["saes"], (8, 16), strict=True):
        assert row["l0"] == pytest.approx(k, abs=0.5)
        ref = sae_lens.SAE.load_from_disk(str(out / row["name"]))
        assert ref.cfg.k == k
    assert "| k=16_lr=0.003 | blocks.2.hook_resid_pre | 16 | 0.003 |" in (out / "summary.md").read_text()
    assert "| k=8_lr=0.001 |" in printed  # the table is printed too
