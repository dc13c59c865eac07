"""Bad input is refused before training with an error that names the field or file, what was expected,
what was found and what to do: token data, the default corpus' order, config fields checked against
the model, and the paths a run writes."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    from bridge.model import load_model

    return load_model("embedded")


@pytest.fixture
def shared_model(model, monkeypatch):
    """`load_model("embedded")` returns the module's model: each check runs without reloading it."""
    import bridge.model

    original = bridge.model.load_model

    def load(name="embedded", **kwargs):
        if name == "embedded" and kwargs.get("device", "cpu") == "cpu":
            return model
        return original(name, **kwargs)

    monkeypatch.setattr(bridge.model, "load_model", load)
    return model


def small_cfg(tmp_path, **changes):
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    data = {"total_training_tokens": 8192, "train_batch_size_tokens": 4096, "lr_decay_steps": 0,
            "n_batches_in_buffer": 2, "checkpoint_path": None, "progress_bar": False, "n_eval_batches": 0,
            "output_path": str(tmp_path / "sae"), "sae": {"d_sae": 256, "k": 16}}
    for key, value in changes.items():
        data[key] = data.get(key, {}) | value if isinstance(value, dict) else value
    return RunConfig.from_yaml(DEFAULT_CONFIG, data)


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), path)
                  for root, dirs, files in os.walk(path) for name in dirs + files)


# ------------------------------------------------------------------ token data
@pytest.mark.parametrize(("rows", "found"), [
    (np.full((3, 40), 5) - np.eye(3, 40, dtype=np.int64) * 6, "from -1 to 5"),  # a negative id would wrap
    (np.full((3, 40), 5.7), "float64"),  # would be truncated to 5
    (np.full((3, 40), 4096, dtype=np.int32), "from 4096 to 4096"),  # one past the embedded vocabulary
])
def test_npy_token_ids_outside_the_vocabulary_are_refused(tmp_path, model, rows, found):
    from bridge.data import token_rows

    np.save(tmp_path / "rows.npy", rows)
    cfg = small_cfg(tmp_path, dataset_path=str(tmp_path / "rows.npy"), context_size=32)
    with pytest.raises(jsae.InputError) as err:
        next(token_rows(cfg, model))
    message = str(err.value)
    assert message.startswith("dataset_path:") and "rows.npy" in message and found in message
    assert "4096" in message  # the vocabulary size


def test_pretokenized_jsonl_ids_are_checked_too(tmp_path, model):
    import json

    from bridge.data import token_rows

    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"tokens": [3] * 31 + [99999]}) for _ in range(3)))
    cfg = small_cfg(tmp_path, dataset_path=str(tmp_path / "rows.jsonl"), context_size=32)
    with pytest.raises(jsae.InputError, match=r"dataset_path: .*rows\.jsonl.*99999.*4096"):
        next(token_rows(cfg, model))


def test_valid_npy_token_rows_still_read(tmp_path, model):
    from bridge.data import token_rows

    rows = (np.arange(3 * 40).reshape(3, 40) % 4096).astype(np.uint16)
    np.save(tmp_path / "rows.npy", rows)
    got = list(token_rows(small_cfg(tmp_path, dataset_path=str(tmp_path / "rows.npy"), context_size=32), model,
                          cycle=False))
    assert got == [r[:32] for r in rows.tolist()]


# ------------------------------------------------------------------ the default corpus' order
def test_stdlib_training_order_is_a_seeded_shuffle_and_heldout_is_unchanged(tmp_path):
    from bridge.corpus import document_names, stdlib_documents
    from bridge.data import text_documents

    ordered = document_names("train")
    assert ordered == sorted(ordered, key=lambda n: (not n.startswith("stdlib/"), n))  # files, then topics
    seed_1, seed_1_again, seed_2 = (document_names("train", seed=s) for s in (1, 1, 2))
    assert sorted(seed_1) == sorted(ordered) and seed_1 != ordered  # a permutation, not the sorted order
    assert seed_1 == seed_1_again and seed_1 != seed_2
    assert document_names("heldout", seed=1) == document_names("heldout") == document_names("heldout", seed=2)
    assert not set(document_names("heldout")) & set(ordered)

    # a run reads its training documents in the order of its seed, and the held-out ones as they were
    cfg = small_cfg(tmp_path, seed=7)
    first = list(itertools.islice(text_documents(cfg), 3))
    assert first == [text for _, text in itertools.islice(stdlib_documents("train", seed=7), 3)]
    want = dict(stdlib_documents("heldout"))
    assert [name for name, _ in stdlib_documents("heldout")] == document_names("heldout")
    assert list(itertools.islice(text_documents(cfg, "heldout"), 3)) == [want[n] for n in document_names("heldout")[:3]]


# ------------------------------------------------------------------ config fields against the model
@pytest.mark.parametrize(("changes", "pattern"), [
    ({"seqpos_slice": [500, 600]}, r"seqpos_slice: \[500, 600\] keeps no position of a row of context_size=128"),
    ({"seqpos_slice": [0, 10, 0]}, r"seqpos_slice: \[0, 10, 0\] has step 0"),
    ({"seqpos_slice": [0.5, 10]}, r"seqpos_slice: .*integers or null.*0\.5"),
])
def test_bad_seqpos_slice(tmp_path, changes, pattern):
    with pytest.raises(jsae.ConfigError, match=pattern):
        small_cfg(tmp_path, **changes)


@pytest.mark.parametrize("value", [["bos", "eos"], [1.5], "yes", [True]])
def test_exclude_special_tokens_must_be_ids(tmp_path, value):
    with pytest.raises(jsae.ConfigError, match=r"exclude_special_tokens: .*true, false or a list of token ids"):
        small_cfg(tmp_path, exclude_special_tokens=value)


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"sequence_separator_token": 999999}, r"sequence_separator_token: 999999 is not a token id of 'embedded'.*4096"),
    ({"exclude_special_tokens": [0, 5000]}, r"exclude_special_tokens: 5000 is not a token id of 'embedded'.*4096"),
    ({"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 99, "sae": {"d_in": 32}},
     r"hook_head_index: 99 is out of range for 'blocks\.0\.attn\.hook_z', which has 4 heads"),
    ({"hook_head_index": 0}, r"hook_head_index: 0 is set, but 'blocks\.2\.hook_resid_pre' has no head axis"),
])
def test_fields_checked_against_the_model(tmp_path, shared_model, capsys, changes, pattern):
    from bridge.dry_run import dry_run_train
    from bridge.run import prepare

    cfg = small_cfg(tmp_path, **changes)
    with pytest.raises(jsae.ConfigError, match=pattern):
        prepare(cfg)
    with pytest.raises(jsae.ConfigError, match=pattern):
        dry_run_train(cfg)


def test_a_head_in_range_still_trains_its_width(tmp_path, shared_model):
    from bridge.run import prepare

    _, cfg = prepare(small_cfg(tmp_path, hook_name="blocks.0.attn.hook_z", hook_head_index=3, sae={"d_in": 32}))
    assert cfg.hook_head_index == 3


def test_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import torch

    from bridge.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--dry-run", "--output-path", str(tmp_path / "sae"), "--set", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "jsae train: error: device: 'cuda'" in err and "no CUDA" in err and "device: cpu" in err


# ------------------------------------------------------------------ files and paths
def test_missing_dataset_file(tmp_path, model):
    from bridge.data import token_rows

    with pytest.raises(jsae.MissingFileError, match=r"dataset_path: .*nope\.npy does not exist"):
        next(token_rows(small_cfg(tmp_path, dataset_path=str(tmp_path / "nope.npy")), model))


def test_a_config_file_holding_a_list(tmp_path, capsys):
    from bridge.cli import main

    (tmp_path / "list.yaml").write_text("- model_name: embedded\n- hook_name: blocks.0.hook_resid_pre\n")
    assert main(["train", str(tmp_path / "list.yaml"), "--dry-run"]) == 2
    assert "list.yaml: expected a mapping of settings, got list" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["   \n\n  \t\n", "\n" * 1000, "\t \n" * 3000])
def test_a_whitespace_only_dataset_is_one_clear_error(tmp_path, model, text):
    import warnings

    from bridge.data import token_rows

    (tmp_path / "blank.txt").write_text(text)
    cfg = small_cfg(tmp_path, dataset_path=str(tmp_path / "blank.txt"))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(jsae.InputError) as err:
        warnings.simplefilter("always")
        list(itertools.islice(token_rows(cfg, model), 1000))
    assert "blank.txt" in str(err.value) and "empty or whitespace only" in str(err.value)
    assert not [w for w in caught if "starting epoch" in str(w.message)]


@pytest.mark.parametrize("field", ["output_path", "checkpoint_path", "log_path"])
def test_a_real_run_checks_every_path_before_training(tmp_path, shared_model, monkeypatch, capsys, field):
    import bridge.run
    from bridge.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(bridge.run, "training_batches", no_training)
    (tmp_path / "taken").write_text("a file")
    paths = {"output_path": tmp_path / "sae", "checkpoint_path": tmp_path / "ckpt", "log_path": tmp_path / "m.jsonl"}
    paths[field] = tmp_path / "taken" / "x" if field == "log_path" else tmp_path / "taken"
    args = ["train", "--set", "total_training_tokens=8192", "--set", "train_batch_size_tokens=4096",
            "--set", "lr_decay_steps=0", "--set", "progress_bar=false", "--set", "n_eval_batches=0"]
    for name, path in paths.items():
        args += ["--set", f"{name}={path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"jsae train: error: {field}: " in err and "taken" in err
    assert tree(tmp_path) == ["taken"]  # nothing written
