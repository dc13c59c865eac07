"""Run configs read numbers as users write them: in config files and in --set values alike."""

from __future__ import annotations

from pathlib import Path

import pytest

import jsae

ROOT = Path(__file__).resolve().parents[1]


def cli_config(*argv):
    from bridge.cli import build_parser, load_config

    return load_config(build_parser().parse_args(list(argv)))


def test_the_readme_command_line_parses(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = cli_config("train", "configs/topk.yaml", "--set", "lr=3e-4", "--set", "sae.k=64")
    assert type(cfg.train.lr) is float and cfg.train.lr == 3e-4
    assert type(cfg.train.sae.k) is int and cfg.train.sae.k == 64
    assert cfg.train.sae.architecture == "topk" and cfg.train.sae.d_sae == 1024  # the rest of the file still holds


@pytest.mark.parametrize(("text", "value"), [
    ("3e-4", 3e-4), ("1e5", 1e5), (".5", 0.5), ("-2E-3", -2e-3), ("+1e+3", 1e3), ("-.5", -0.5), ("2.5e-3", 2.5e-3),
    ("1.", 1.0), ("0.001", 0.001), ("1_000.5", 1000.5), (".inf", float("inf")), ("-.inf", float("-inf")),
])
def test_floats_in_yaml_1_2_syntax(text, value):
    from bridge.run_config import load_yaml

    got = load_yaml(text)
    assert type(got) is float and got == value
    assert load_yaml(f"[{text}]") == [value] and load_yaml(f"lr: {text}") == {"lr": value}


@pytest.mark.parametrize(("text", "value"), [("64", 64), ("-3", -3), ("1_000", 1000), ("0x1e5", 0x1E5), ("0", 0)])
def test_integers_stay_integers(text, value):
    from bridge.run_config import load_yaml

    got = load_yaml(text)
    assert type(got) is int and got == value


@pytest.mark.parametrize("text", ["1e", "e5", "1e-", "v1.2", "1.2.3", "3e-4x", "abc", ".", "1e5.0", "blocks.2.hook_resid_pre",
                                  "stdlib", "1.5e-3 tokens"])
def test_strings_that_are_not_numbers_stay_strings(text):
    from bridge.run_config import load_yaml

    assert load_yaml(text) == text


def test_other_yaml_types_unchanged():
    from bridge.run_config import load_yaml

    assert load_yaml("null") is None and load_yaml("true") is True and load_yaml("[1, 2.5, x]") == [1, 2.5, "x"]
    assert load_yaml("{sae.k: [8, 16], lr: [1e-3, 3e-4]}") == {"sae.k": [8, 16], "lr": [1e-3, 3e-4]}
    assert load_yaml("2001-12-14").year == 2001  # a date, as before


def test_a_config_file_with_lr_3e_4_loads_as_float(tmp_path):
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    path = tmp_path / "run.yaml"
    text = DEFAULT_CONFIG.read_text().replace("lr: 0.001", "lr: 3e-4")
    assert "lr: 3e-4" in text
    path.write_text(text + "lr_end: 1e-5\n")
    cfg = RunConfig.from_yaml(path)
    assert type(cfg.train.lr) is float and cfg.train.lr == 3e-4 and cfg.train.lr_end == 1e-5


def test_sweep_values_through_set():
    cfg = cli_config("train", "--set", "sweep={sae.k: [8, 16], lr: [1e-3, 3e-4]}")
    assert cfg.sweep == {"sae.k": [8, 16], "lr": [1e-3, 3e-4]}


def test_a_string_where_a_number_goes_is_still_refused(tmp_path):
    with pytest.raises(jsae.ConfigError, match="lr"):
        cli_config("train", "--set", "lr=fast")


def test_a_config_file_that_is_not_a_mapping(tmp_path):
    from bridge.run_config import RunConfig

    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(jsae.ConfigError, match="expected a mapping"):
        RunConfig.from_yaml(tmp_path / "list.yaml")


@pytest.mark.parametrize("head", [None, 3])
def test_use_cached_activations_reads_sae_lens_default_cache_path(head):
    """use_cached_activations: true with no path trains from the folder SAELens' runner would read
    (and its CacheActivationsRunner writes by default)."""
    from sae_lens.config import _default_cached_activations_path

    extra = [] if head is None else ["--set", f"hook_head_index={head}", "--set", "hook_name=blocks.1.attn.hook_z"]
    cfg = cli_config("train", "--set", "use_cached_activations=true", "--set", "dataset_path=org/my-data",
                     "--set", "model_name=org/model", *extra)
    assert cfg.activations_cache == _default_cached_activations_path("org/my-data", "org/model", cfg.hook_name, head)
    assert cfg.activations_cache.startswith("activations/org_my-data/org_model/")


def test_use_cached_activations_switches_cached_activations_path_as_in_sae_lens():
    from jsae import ConfigError

    given = ["--set", "cached_activations_path=acts/here"]
    assert cli_config("train", *given).activations_cache == "acts/here"  # not given: a path is the cache
    assert cli_config("train", *given, "--set", "use_cached_activations=true").activations_cache == "acts/here"
    assert cli_config("train", *given, "--set", "use_cached_activations=false").activations_cache is None
    assert cli_config("train").activations_cache is None
    with pytest.raises(ConfigError, match="use_cached_activations is false but activation_cache_path"):
        cli_config("train", "--set", "activation_cache_path=acts", "--set", "use_cached_activations=false")
    with pytest.raises(ConfigError, match="use_cached_activations must be true or false"):
        cli_config("train", "--set", "use_cached_activations=yes please")


def test_dry_run_names_the_default_cache_path_it_would_read(tmp_path, monkeypatch, capsys):
    from bridge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("use_cached_activations: true\ntotal_training_tokens: 8192\n"
                                     "sae: {architecture: topk, d_in: 128, d_sae: 256, k: 8}\n")
    assert main(["train", "c.yaml", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cached_activations_path: activations/stdlib/embedded/blocks.2.hook_resid_pre does not exist yet" in out
