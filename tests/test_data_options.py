"""Data options, each checked against sae_lens on the same inputs: eval_dataset_path, use_chat_formatting,
`jsae pretokenize` (read back by sae_lens' pretokenized path and by jsae), activations_mixing_fraction."""

from __future__ import annotations

import json

import pytest
import torch

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::RuntimeWarning")

DOCS = ["def add(a, b):\n    return a + b\n" * 2, "The quick brown fox jumps over the lazy dog. " * 5, "x",
        "import os\nprint(os.getcwd())\n" * 3, "class A:\n    pass\n" * 4, "short"] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def model():
    from bridge.model import load_model

    return load_model("embedded", device="cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_config(**fields):
    from bridge.run_config import RunConfig

    return RunConfig.from_dict({"context_size": 32, "sae": {"architecture": "standard", "d_in": 128, "d_sae": 256},
                                "total_training_tokens": 10**5, "store_batch_size_prompts": 4} | fields)


def saelens_rows(model, dataset, n, **kw):
    """n token rows from sae_lens' ActivationsStore reading `dataset` (a datasets.Dataset) with `model`."""
    from sae_lens.training.activations_store import ActivationsStore

    args = dict(model=model, dataset=dataset, streaming=False, hook_name="blocks.1.hook_resid_post",
                hook_head_index=None, context_size=32, d_in=128, n_batches_in_buffer=2, total_training_tokens=10**5,
                store_batch_size_prompts=4, train_batch_size_tokens=64, prepend_bos=True,
                normalize_activations="none", device="cpu", dtype="float32")
    return ActivationsStore(**(args | kw)).get_batch_tokens(n).tolist()


def jsonl_dataset(path):
    import datasets

    return datasets.load_dataset("json", data_files=path, split="train")


# ------------------------------------------------------------------ eval_dataset_path
def test_eval_dataset_path_gives_that_datasets_rows(model, tmp_path):
    from bridge.eval_run import eval_token_batches

    path = write_jsonl(tmp_path / "held.jsonl", [{"text": d} for d in DOCS])
    cfg = run_config(eval_dataset_path=path, n_eval_batches=2, eval_batch_size_prompts=3)
    got = eval_token_batches(cfg, model)
    assert [tuple(b.shape) for b in got] == [(3, 32), (3, 32)]
    assert torch.cat(got).tolist() == saelens_rows(model, jsonl_dataset(path), 6)
    default = eval_token_batches(run_config(n_eval_batches=2, eval_batch_size_prompts=3), model)
    assert torch.cat(default).tolist() != torch.cat(got).tolist()  # not the stdlib's held-out rows
    with pytest.raises(jsae.ConfigError, match="eval_dataset_path"):
        run_config(eval_dataset_path=3)


def test_dry_run_reads_the_eval_dataset(tmp_path, capsys):
    from bridge.cli import main

    path = write_jsonl(tmp_path / "held.jsonl", [{"text": d} for d in DOCS])
    assert main(["train", "--dry-run", "--set", f"eval_dataset_path={path}", "--set", "context_size=32",
                 "--output-path", str(tmp_path / "out")]) == 0
    assert f"eval_dataset_path: {path}: read a first row of 32 tokens" in capsys.readouterr().out


# ------------------------------------------------------------------ use_chat_formatting
@pytest.fixture()
def chat_model(model):
    model.tokenizer.chat_template = CHAT_TEMPLATE
    yield model
    model.tokenizer.chat_template = None


@pytest.mark.parametrize("column", ["messages", "text"])
def test_chat_formatting_rows_equal_saelens(chat_model, tmp_path, column):
    from bridge.data import token_rows

    if column == "text":
        rows = [{"text": d} for d in DOCS]
    else:
        rows = [{"messages": [{"role": "user", "content": d}, {"role": "assistant", "content": d[::-1]}]} for d in DOCS]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    want = saelens_rows(chat_model, jsonl_dataset(path), 8, use_chat_formatting=True)
    got = token_rows(run_config(dataset_path=path, use_chat_formatting=True), chat_model, cycle=False)
    got = [next(got) for _ in range(8)]
    assert got == want
    plain = token_rows(run_config(dataset_path=path), chat_model, cycle=False)
    if column == "text":
        assert [next(plain) for _ in range(8)] != got  # the template's tokens are there


def test_chat_formatting_needs_a_template_and_text(model, tmp_path):
    import numpy as np

    from bridge.data import token_rows

    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": d} for d in DOCS])
    with pytest.raises(jsae.ConfigError, match="no chat template"):
        next(token_rows(run_config(dataset_path=path, use_chat_formatting=True), model))
    model.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        np.save(tmp_path / "rows.npy", np.zeros((4, 40), dtype=np.int32))
        with pytest.raises(jsae.InputError, match="needs untokenized data"):
            next(token_rows(run_config(dataset_path=str(tmp_path / "rows.npy"), use_chat_formatting=True), model))
    finally:
        model.tokenizer.chat_template = None


# ------------------------------------------------------------------ jsae pretokenize
def test_pretokenize_writes_what_saelens_reads_and_writes(model, tmp_path, capsys):
    import datasets
    from sae_lens.config import PretokenizeRunnerConfig
    from sae_lens.pretokenize_runner import PretokenizedDatasetMetadata, pretokenize_dataset

    from bridge.cli import main
    from bridge.data import token_rows

    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "tokens"
    settings = ["--set", f"dataset_path={path}", "--set", "context_size=32"]
    assert main(["pretokenize", "--save-path", str(out), *settings, "--dry-run"]) == 0
    assert not out.exists() and "dry run: every check passed" in capsys.readouterr().out
    assert main(["pretokenize", "--save-path", str(out), *settings]) == 0
    saved = datasets.load_from_disk(str(out))
    assert saved.column_names == ["input_ids"] and saved.format["type"] == "torch"
    ours = saved.with_format(None)["input_ids"]
    # the rows a run packs from the text
    cfg = run_config(dataset_path=path)
    assert ours == list(token_rows(cfg, model, cycle=False))
    # sae_lens' PretokenizeRunner writes the same rows from the same text (no shuffle)
    theirs = pretokenize_dataset(jsonl_dataset(path), model.tokenizer, PretokenizeRunnerConfig(
        context_size=32, shuffle=False, num_proc=1, begin_batch_token="bos", sequence_separator_token="bos"))
    assert ours == [row.tolist() for row in theirs["input_ids"]]
    # sae_lens' pretokenized path reads the folder: its rows are ours
    assert saelens_rows(model, saved, len(ours)) == ours
    metadata = PretokenizedDatasetMetadata(**json.loads((out / "sae_lens.json").read_text()))
    assert metadata.context_size == 32 and metadata.begin_batch_token == "bos" and not metadata.shuffled
    # jsae reads the folder as dataset_path
    assert list(token_rows(run_config(dataset_path=str(out)), model, cycle=False)) == ours
    capsys.readouterr()
    assert main(["pretokenize", "--save-path", str(out), *settings, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--save-path" in err and "already exists" in err


# ------------------------------------------------------------------ activations_mixing_fraction
SIZES = [300, 512, 100, 700, 64, 999, 256, 512, 1500, 40, 800]


def numbered_chunks(width=3):
    """Activations whose every entry is the token's index in the stream, in chunks of SIZES tokens."""
    bounds = [sum(SIZES[:i]) for i in range(len(SIZES) + 1)]
    return [torch.arange(lo, hi, dtype=torch.float32)[:, None].repeat(1, width) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_mixing_fraction_serves_as_saelens_mixing_buffer(fraction):
    """What sae_lens' mixing_buffer serves from the same stream: as many batches after each refill, as many
    tokens kept; with no mixing (0) the same batches, in the order the tokens came."""
    from sae_lens.training.mixing_buffer import mixing_buffer

    from bridge.activations import ShuffleBuffer

    capacity, batch = 1024, 128
    buffer = ShuffleBuffer(capacity, batch, keep_fraction=fraction, seed=3)
    ours = [[b[:, 0].tolist() for b in buffer.add(chunk)] for chunk in numbered_chunks()]

    state = {}

    def loader():
        for i, chunk in enumerate(numbered_chunks()):
            state["chunk"] = i
            yield chunk
        state["chunk"] = None  # from here mixing_buffer flushes what it kept, which a stream never reaches

    theirs = [[] for _ in SIZES]
    for b in mixing_buffer(capacity, batch, loader(), fraction):
        if state["chunk"] is not None:
            theirs[state["chunk"]].append(b[:, 0].tolist())
    assert [len(b) for b in ours] == [len(b) for b in theirs]
    assert sum(map(len, ours)) > 10
    assert buffer.pending_tokens == sum(SIZES) - batch * sum(map(len, theirs))
    flat = [t for batches in ours for b in batches for t in b]
    assert len(flat) == len(set(flat))  # each token served once
    if fraction == 0:
        assert ours == theirs and flat == sorted(flat)
    else:
        assert flat != sorted(flat)


def test_mixing_fraction_field(model):
    import dataclasses

    from sae_lens.config import LanguageModelSAERunnerConfig

    from bridge.data import token_rows
    from bridge.sources import activation_source

    default = {f.name: f.default for f in dataclasses.fields(LanguageModelSAERunnerConfig)}
    assert run_config().activations_mixing_fraction == default["activations_mixing_fraction"] == 0.5
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(jsae.ConfigError, match="activations_mixing_fraction"):
            run_config(activations_mixing_fraction=bad)
    # 0 through a run's source: batches in the model's order, the activations of the run's first rows
    cfg = run_config(activations_mixing_fraction=0, n_batches_in_buffer=2, train_batch_size_tokens=64,
                     hook_name="blocks.1.hook_resid_post")
    source = activation_source(cfg, model)
    source.as_jax = False
    source.prefetch = 0
    first = next(iter(source))
    rows = token_rows(cfg, model)
    tokens = torch.tensor([next(rows) for _ in range(2)])
    torch.testing.assert_close(first, source.model_activations(tokens)[:64])
    source.close()
