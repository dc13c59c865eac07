"""Inputs bench/probes.py found accepted silently or refused unclearly, each refused by a jsae error that names
the field or file."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jsae
from jsae.io import read_safetensors, write_safetensors


@pytest.fixture
def folder(tmp_path):
    jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4), seed=0).save_model(tmp_path / "sae")
    return tmp_path / "sae"


@pytest.mark.parametrize("name,index,value", [("W_enc", (0, 0), np.nan), ("b_dec", (3,), np.inf)])
def test_loading_non_finite_weights_is_refused_naming_the_tensor(folder, name, index, value):
    path = folder / "sae_weights.safetensors"
    tensors = read_safetensors(path)
    tensors[name][index] = value
    write_safetensors(path, tensors)
    with pytest.raises(jsae.FormatError, match=rf"sae: the SAE's weights are not finite .*{name}: 1 of"):
        jsae.SAE.load_from_disk(folder)


def test_a_dead_feature_sparsity_of_minus_infinity_still_loads(folder):
    sparsity = np.zeros(32, np.float32)
    sparsity[5] = -np.inf  # log10 of a feature that never fired
    sae = jsae.SAE.load_from_disk(folder).replace(sparsity=sparsity)
    sae.save_model(folder)
    assert np.isneginf(np.asarray(jsae.SAE.load_from_disk(folder).sparsity)[5])


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    path = tmp_path / "run.yaml"
    path.write_text(DEFAULT_CONFIG.read_text() + "lr: 0.5\n")  # lr is set above too
    with pytest.raises(jsae.ConfigError, match=r"(?s)run\.yaml: not valid YAML .*the key 'lr' twice.*line \d+"):
        RunConfig.from_yaml(path)
    nested = DEFAULT_CONFIG.read_text().replace("  k: 32", "  k: 32\n  k: 8")
    path.write_text(nested)
    with pytest.raises(jsae.ConfigError, match=r"the key 'k' twice"):
        RunConfig.from_yaml(path)


def test_a_merge_key_still_reads(tmp_path):
    from bridge.run_config import load_yaml

    assert load_yaml("base: &b {k: 4, d_in: 8}\nsae: {<<: *b, k: 16}") == {"base": {"k": 4, "d_in": 8},
                                                                          "sae": {"k": 16, "d_in": 8}}


def test_a_config_file_that_is_not_text_is_refused_naming_it(tmp_path):
    from bridge.run_config import RunConfig

    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\x00\xfe\x9a\n")
    with pytest.raises(jsae.ConfigError, match=r"run\.yaml: not UTF-8 text"):
        RunConfig.from_yaml(path)


@pytest.mark.parametrize("pair,message", [
    ("lr", r"--set expects KEY=VALUE, got 'lr'"),
    ("lr=[1,", r"--set lr: not a YAML value: '\[1,'"),
])
def test_a_malformed_set_is_a_jsae_error_exit_2(capsys, pair, message):
    from bridge.cli import main

    assert main(["train", "--dry-run", "--set", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jsae train: error: --set") and "Traceback" not in err
    assert re.search(message, err)


@pytest.mark.parametrize("value,found", [({"x": 1}, "a mapping"), ([1, 2], "a list")])
def test_a_number_field_given_a_mapping_or_list_names_the_field(value, found):
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    with pytest.raises(jsae.ConfigError, match=rf"lr must be a number, got {found}"):
        RunConfig.from_yaml(DEFAULT_CONFIG, {"lr": value})
    with pytest.raises(jsae.ConfigError, match=rf"total_training_tokens must be a number, got {found}"):
        RunConfig.from_yaml(DEFAULT_CONFIG, {"total_training_tokens": value})


@pytest.mark.parametrize("field,value,expected", [
    ("model_name", [1, 2], "a string"), ("hook_name", 7, "a string"), ("dataset_path", {"a": 1}, "a string"),
    ("eval_dataset_path", 3, "a string or null"), ("streaming", "maybe", "true or false"),
    ("prepend_bos", 2, "true or false"), ("fused_forward", "no way", "true or false"),
])
def test_a_run_field_of_the_wrong_type_names_the_field(field, value, expected):
    from bridge.run_config import RunConfig

    with pytest.raises(jsae.ConfigError, match=re.escape(f"{field} must be {expected}, got {value!r}")):
        RunConfig(**{field: value})


@pytest.mark.parametrize("content", ["object", "truncated"])
def test_an_unreadable_npy_dataset_names_the_file(tmp_path, content):
    from bridge.data import _load_npy

    path = tmp_path / "rows.npy"
    if content == "object":
        np.save(path, np.array([[1, 2], "x"], dtype=object), allow_pickle=True)
    else:
        np.save(path, np.ones((64, 32), np.int64))
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(jsae.InputError, match=r"dataset_path: .*rows\.npy is not a readable \.npy array of token rows"):
        _load_npy(path)


@pytest.mark.parametrize("field,value,expected", [
    ("model_from_pretrained_kwargs", 7, "a mapping"), ("hook_names", 7, "a list or null"),
    ("hook_names", "blocks.0.hook_resid_pre", "a list or null"),
])
def test_a_run_mapping_or_list_field_of_another_type_names_the_field(field, value, expected):
    from bridge.run_config import RunConfig

    with pytest.raises(jsae.ConfigError, match=re.escape(f"{field} must be {expected}, got {value!r}")):
        RunConfig(**{field: value})


@pytest.mark.parametrize("name,content", [("rows.jsonl", '{"text": "a"}\n{not json\n'), ("rows.parquet", "PAR1 no")])
def test_a_local_data_file_the_reader_cannot_parse_names_the_file(tmp_path, name, content):
    from bridge.data import text_documents
    from bridge.run_config import RunConfig

    (tmp_path / name).write_text(content)
    cfg = RunConfig(dataset_path=str(tmp_path / name))
    with pytest.raises(jsae.InputError, match=rf"dataset_path: .*{re.escape(name)} could not be read as "):
        list(text_documents(cfg))


def _train_config(**kw):
    return jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4), total_training_tokens=640,
                            train_batch_size_tokens=64, **kw)


@pytest.mark.parametrize("field,value,message", [
    ("resume", "maybe", "resume must be true or false, got 'maybe'"),
    ("progress_bar", 2, "progress_bar must be true or false, got 2"),
    ("log_to_wandb", "no", "log_to_wandb must be true or false, got 'no'"),
    ("output_path", [1, 2], "output_path must be a string or null, got [1, 2]"),
    ("log_path", 3, "log_path must be a string or null, got 3"),
    ("lr_scheduler_name", [1], "lr_scheduler_name must be a string, got [1]"),
    ("lr_end", float("nan"), "lr_end must be >= 0, got nan"),
    ("lr", float("inf"), "lr must be finite, got inf"),
    ("eval_every_n_steps", -1, "eval_every_n_steps must be an integer >= 0, got -1"),
    ("sync_every_n_steps", -1, "sync_every_n_steps must be a positive integer or null, got -1"),
])
def test_a_train_field_of_the_wrong_type_or_range_names_it(field, value, message):
    with pytest.raises(jsae.ConfigError, match=re.escape(f"TrainConfig.{message}")):
        _train_config(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("rescale_acts_by_decoder_norm", "maybe", "rescale_acts_by_decoder_norm must be true or false, got 'maybe'"),
    ("use_sparse_activations", 2, "use_sparse_activations must be true or false, got 2"),
    ("aux_loss_coefficient", float("nan"), "aux_loss_coefficient must be a finite number, got nan"),
    ("decoder_init_norm", "abc", "decoder_init_norm must be a finite number or null, got 'abc'"),
    ("device", [1, 2], "device must be a string, got [1, 2]"),
])
def test_an_sae_field_of_the_wrong_type_names_it(field, value, message):
    with pytest.raises(jsae.ConfigError, match=re.escape(f"TopKTrainingSAEConfig.{message}")):
        jsae.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4, **{field: value})


@pytest.mark.parametrize("context_size", [0, -4])
def test_eval_context_size_below_one_is_refused_not_replaced_by_the_default(context_size):
    from bridge.eval_run import eval_run_config

    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4, metadata=jsae.Metadata(
        hook_name="blocks.0.hook_resid_pre", context_size=32)), seed=0)
    with pytest.raises(jsae.ConfigError, match=re.escape(f"tokens per row (--context-size) must be >= 1, got "
                                                         f"{context_size}")):
        eval_run_config(sae, context_size=context_size)
    assert eval_run_config(sae).context_size == 32


def test_a_model_name_transformer_lens_does_not_know_names_model_name():
    from bridge.model import load_model

    with pytest.raises(jsae.ConfigError, match=r"model_name: 'no-such-model-xyz' is not an official TransformerLens "
                                               r"model name, a local folder or 'embedded'"):
        load_model("no-such-model-xyz", device="cpu")
    with pytest.raises(jsae.ConfigError, match=r"'gpt2-smal' is not an official.*Did you mean 'gpt2-small'"):
        load_model("gpt2-smal", device="cpu")


@pytest.mark.parametrize("seed", ["x", 1.5, None])
def test_from_config_seed_must_be_an_integer(seed):
    with pytest.raises(jsae.ConfigError, match=re.escape(f"SAE.from_config: seed must be an integer, got {seed!r}")):
        jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4), seed=seed)


@pytest.mark.parametrize("sae", [None, 5, [1, 2]])
def test_an_sae_section_that_is_not_a_mapping_names_it(sae):
    with pytest.raises(jsae.ConfigError, match=re.escape(f"run.yaml: the 'sae' section must be a mapping of SAE "
                                                         f"fields (architecture, d_in, d_sae, ...), got {sae!r}")):
        jsae.TrainConfig.from_dict({"sae": sae, "total_training_tokens": 640}, where="run.yaml")


@pytest.mark.parametrize("device", ["bogus_value", "", "cuda:x", "gpu"])
def test_an_sae_device_that_is_no_torch_device_names_the_field(device):
    with pytest.raises(jsae.ConfigError, match=r"TopKSAEConfig.device must be a torch device name"):
        jsae.TopKSAEConfig(d_in=4, d_sae=8, k=2, device=device)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "meta"])
def test_torch_device_names_as_sae_lens_writes_them_are_kept(device):
    assert jsae.TopKSAEConfig(d_in=4, d_sae=8, k=2, device=device).device == device
