"""The SAELens registry snapshot jsae ships, its preference rules, and `jsae pretrained`."""

from __future__ import annotations

import json
import sys

import pytest

from bridge.cli import main
from jsae import converters, pretrained, releases


@pytest.fixture
def fresh_registries():
    """Clear the cached registries before and after a test that changes where they come from."""
    caches = (releases.saelens_registry, releases.snapshot_registry, releases.snapshot_version)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_snapshot_equals_installed_saelens_registry(tmp_path):
    """The shipped snapshot is SAELens 6.54.12's pretrained_saes.yaml, entry for entry, and the script
    regenerates it byte for byte from the installed sae_lens."""
    path, version = releases.saelens_registry_path(), releases.saelens_version()
    if path is None:
        pytest.skip("sae_lens is not installed")
    snap_version, snap = releases.read_snapshot()
    assert snap_version == "6.54.12"
    assert version == snap_version, "regenerate with scripts/snapshot_saelens_registry.py"
    assert snap == releases.read_saelens_yaml(path)
    assert len(snap) == 170 and sum(len(e["saes"]) for e in snap.values()) == 13_857
    sys.path.insert(0, "scripts")
    try:
        import snapshot_saelens_registry
    finally:
        sys.path.pop(0)
    assert snapshot_saelens_registry.main(["--out", str(tmp_path / "snap.json.gz")]) == 0
    assert (tmp_path / "snap.json.gz").read_bytes() == releases.SNAPSHOT_PATH.read_bytes()


def test_every_release_resolves_without_saelens(monkeypatch, tmp_path, fresh_registries):
    """sae_lens neither imported nor readable (even claiming to be newer): all 170 releases still resolve."""
    for name in [m for m in sys.modules if m == "sae_lens" or m.startswith("sae_lens.")]:
        monkeypatch.delitem(sys.modules, name)
    broken = tmp_path / "pretrained_saes.yaml"
    broken.write_text("gpt2-small-res-jb: [unclosed\n")
    monkeypatch.setattr(releases, "saelens_registry_path", lambda: broken)
    monkeypatch.setattr(releases, "saelens_version", lambda: "99.0.0")
    _, data = releases.read_snapshot()
    n_ids = 0
    for name, entry in data.items():
        for sae in entry["saes"]:
            repo_id, path, converter, overrides, nsf = pretrained.locate(name, str(sae["id"]))
            assert (repo_id, path) == (entry["repo_id"], str(sae["path"]))
            assert converter == (entry.get("conversion_func") or "sae_lens")
            assert overrides.get("neuronpedia_id") == sae.get("neuronpedia")
            assert nsf == sae.get("norm_scaling_factor")
            n_ids += 1
        if (entry.get("conversion_func") or "sae_lens") in converters.CONVERTERS:
            assert pretrained.resolve(name, str(entry["saes"][0]["id"]))[0] == entry["repo_id"]
        else:  # a format jsae does not convert is a clear error naming the release
            with pytest.raises(pretrained.ConfigError, match=name):
                pretrained.resolve(name, str(entry["saes"][0]["id"]))
    assert len(data) == 170 and n_ids == 13_857
    assert not any(m == "sae_lens" or m.startswith("sae_lens.") for m in sys.modules)


def test_newer_saelens_registry_is_preferred(monkeypatch, tmp_path, fresh_registries):
    _, data = releases.read_snapshot()
    changed = {"gpt2-small-res-jb": dict(data["gpt2-small-res-jb"], repo_id="someone/newer-repo"),
               "a-new-release": {"repo_id": "someone/new", "model": "m", "conversion_func": None,
                                 "saes": [{"id": "x", "path": "x"}]}}
    newer = tmp_path / "pretrained_saes.yaml"
    newer.write_text(json.dumps(changed))  # JSON is YAML
    monkeypatch.setattr(releases, "saelens_registry_path", lambda: newer)
    monkeypatch.setattr(releases, "saelens_version", lambda: "6.99.0")
    assert releases.get_release("gpt2-small-res-jb").repo_id == "someone/newer-repo"
    assert releases.get_release("a-new-release").repo_id == "someone/new"
    assert releases.get_release("gemma-scope-2b-pt-res").repo_id == "google/gemma-scope-2b-pt-res"  # snapshot fills in
    releases.saelens_registry.cache_clear()
    monkeypatch.setattr(releases, "saelens_version", lambda: "6.0.0")  # older: the snapshot wins
    assert releases.get_release("gpt2-small-res-jb").repo_id == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert releases.get_release("a-new-release").repo_id == "someone/new"


@pytest.mark.parametrize("text,widths", [("layer_12/width_16k/canonical", {16384}), ("blocks.8.hook_resid_pre_24576",
                                          {24576}), ("layer_3_width_1m_l0_big", {1 << 20}), ("l0r_8x", set())])
def test_widths_in_ids(text, widths):
    assert releases.widths_in(text) == widths


def json_rows(capsys, *argv):
    assert main(["pretrained", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_lists_and_filters(capsys):
    rows = json_rows(capsys, "gpt2-small-res-jb", "--hook", "hook_resid_pre")
    assert {r["sae_id"] for r in rows} == {f"blocks.{i}.hook_resid_pre" for i in range(12)}
    assert all(r["repo_id"] == "jbloom/GPT2-Small-SAEs-Reformatted" and r["jsae_loads"] for r in rows)
    row = next(r for r in rows if r["sae_id"] == "blocks.8.hook_resid_pre")
    assert row["neuronpedia"] == "gpt2-small/8-res-jb" and row["path"] == "blocks.8.hook_resid_pre"
    rows = json_rows(capsys, "--model", "gemma-3-270m", "--hook", "resid_post/layer_12", "--width", "16k")
    assert rows and all("width_16k" in r["path"] and r["conversion_func"] == "gemma_3" for r in rows)
    assert {r["release"] for r in rows} == {"gemma-scope-2-270m-pt-res", "gemma-scope-2-270m-it-res"}


def test_cli_text_dry_run_and_errors(capsys):
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 170 and any(line.startswith("gpt2-small-res-jb  model=gpt2-small") for line in out)
    assert main(["pretrained", "qwen-scope-3-8b", "--hook", "layer35"]) == 0
    out = capsys.readouterr().out
    assert "layer35  path=layer35.sae.pt" in out and "conversion_func=qwen_scope" in out
    assert main(["pretrained", "--dry-run", "llama_scope"]) == 0
    assert "SAE ids in" in capsys.readouterr().out
    assert main(["pretrained", "no-such-release-anywhere"]) == 1
    assert main(["pretrained", "--width", "sixteen"]) == 2
    assert "--width" in capsys.readouterr().err
