"""`--dry-run`: every check a run makes before training, then exit 0 having trained and written nothing."""

from __future__ import annotations

import os
import sys
import types

import pytest

import jsae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
HOOK = "blocks.2.hook_resid_pre"


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), path)
                  for root, dirs, files in os.walk(path) for name in dirs + files)


@pytest.fixture
def fake_plan(monkeypatch):
    """A jsae.backends whose resolve_plan reports what it was asked, for the CLI's plan line."""
    calls = []

    class Plan:
        def __init__(self, n_members):
            self.n_members = n_members

        def describe(self):
            return f"test plan for {self.n_members} member(s)"

    def resolve_plan(train_cfg, *, devices=None, n_members=1):
        calls.append((train_cfg, n_members))
        return Plan(n_members)

    monkeypatch.setitem(sys.modules, "jsae.backends", types.SimpleNamespace(resolve_plan=resolve_plan,
                                                                           default_platform=lambda: "cpu"))
    return calls


def test_train_dry_run_of_the_default_config_writes_nothing(tmp_path, monkeypatch, capsys):
    from bridge.cli import main

    monkeypatch.chdir(tmp_path)  # the default config's output and checkpoint paths are relative: runs/default/...
    assert main(["train", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert tree(tmp_path) == []  # no SAE folder, no checkpoint folder, no probe left behind
    assert f"hook {HOOK} (width 128 = sae.d_in)" in out
    assert "read a first row of 128 tokens" in out
    assert "output_path: runs/default/sae (will be created)" in out
    assert "checkpoint_path: runs/default/checkpoints (will be created)" in out
    assert "log_path: runs/default/sae/metrics.jsonl (will be created)" in out
    assert out.rstrip().endswith("nothing was trained or written.")
    plan_lines = [line for line in out.splitlines() if line.startswith("plan: ")]
    assert len(plan_lines) == 1 and plan_lines[0].startswith("plan: cpu: topk ")


def test_train_dry_run_prints_the_plan_line(tmp_path, fake_plan, capsys):
    from bridge.cli import main

    assert main(["train", "--dry-run", "--output-path", str(tmp_path / "sae"), "--set", "checkpoint_path=null",
                 "--set", "sweep={sae.k: [8, 16]}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("jsae train: sweep of 2 topk SAE")
    assert "plan: test plan for 2 member(s)" in lines and "SAEs: 2" in "\n".join(lines)
    assert fake_plan[0][0].sae.d_sae == 1024 and tree(tmp_path) == []


def test_a_real_train_prints_the_plan_line_after_its_first(tmp_path, fake_plan, monkeypatch, capsys):
    import bridge.cli
    import bridge.run
    from bridge.cli import main

    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=128, d_sae=1024, k=32), seed=0)
    monkeypatch.setattr(bridge.run, "run", lambda cfg: (sae, {"dead_features": 0, "dead_fraction": 0.0}))
    # the huge-page hint reads jsae.backends, which fake_plan replaces with its resolve_plan alone
    monkeypatch.setattr(bridge.cli, "_hugepage_hint", lambda: None)
    assert main(["train", "--output-path", str(tmp_path / "sae")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("jsae train: topk SAE 128 -> 1024") and lines[1] == "plan: test plan for 1 member(s)"


def test_output_path_that_is_a_file(tmp_path, capsys):
    from bridge.cli import main

    (tmp_path / "taken").write_text("not a folder")
    assert main(["train", "--dry-run", "--output-path", str(tmp_path / "taken"), "--set", "checkpoint_path=null"]) == 2
    err = capsys.readouterr().err
    assert "error: output_path:" in err and "taken is a file" in err
    assert tree(tmp_path) == ["taken"]


def test_a_path_under_a_file(tmp_path, capsys):
    from bridge.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["train", "--dry-run", "--output-path", str(tmp_path / "sae"),
                 "--set", f"checkpoint_path={tmp_path / 'file' / 'ckpt'}"]) == 2
    assert "error: checkpoint_path:" in capsys.readouterr().err


def test_dataset_path_that_does_not_exist(tmp_path, capsys):
    from bridge.cli import main

    missing = tmp_path / "no-such-data"
    assert main(["train", "--dry-run", "--output-path", str(tmp_path / "sae"), "--set", "checkpoint_path=null",
                 "--set", f"dataset_path={missing}"]) == 2
    err = capsys.readouterr().err
    assert "error: dataset_path:" in err and "no-such-data does not exist" in err
    assert tree(tmp_path) == []


def test_a_hook_the_model_lacks(tmp_path, capsys):
    from bridge.cli import main

    assert main(["train", "--dry-run", "--set", "checkpoint_path=null", "--output-path", str(tmp_path / "s"),
                 "--set", "hook_name=blocks.9.hook_resid_pre"]) == 2
    assert "'blocks.9.hook_resid_pre' is not a hook point" in capsys.readouterr().err


def test_cache_dry_run(tmp_path, capsys):
    from bridge.cli import main

    assert main(["cache", "--dry-run", "--cache-path", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"activation_cache_path: {tmp_path / 'cache'} (will be created)" in out and tree(tmp_path) == []
    (tmp_path / "cache").mkdir()
    assert main(["cache", "--dry-run", "--cache-path", str(tmp_path / "cache")]) == 2
    assert "activation_cache_path:" in capsys.readouterr().err


def test_eval_dry_run_of_a_saved_folder(tmp_path, capsys):
    from bridge.cli import main

    folder = tmp_path / "sae"
    cfg = jsae.TopKSAEConfig(d_in=128, d_sae=256, k=8, metadata=jsae.Metadata(hook_name=HOOK))
    jsae.SAE.from_config(cfg, seed=0).save_model(folder)
    before = tree(tmp_path)
    assert main(["eval", str(folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"hook {HOOK} (width 128 = the SAE's d_in)" in out and "split heldout" in out
    assert tree(tmp_path) == before
    assert main(["eval", str(folder), "--dry-run", "--hook", "blocks.1.hook_attn_out", "--model", "embedded",
                 "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "dataset_path:" in capsys.readouterr().err


def test_train_from_a_cache_not_written_yet_or_unfinished(tmp_path, capsys):
    from bridge.cli import main

    args = ["train", "--dry-run", "--output-path", str(tmp_path / "sae"), "--set", "checkpoint_path=null"]
    assert main([*args, "--set", f"activation_cache_path={tmp_path / 'cache'}"]) == 0
    assert "does not exist yet; write it with `jsae cache`" in capsys.readouterr().out
    (tmp_path / "half").mkdir()  # a caching run that died: no cache.json
    assert main([*args, "--set", f"activation_cache_path={tmp_path / 'half'}"]) == 2
    assert "not a finished jsae activation cache" in capsys.readouterr().err
