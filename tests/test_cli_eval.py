"""`jsae eval SAE_DIR`: sae_lens folders evaluated unchanged, equal to sae_lens' run_evals; clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from saelens_helpers import make_saelens_sae
from test_bridge_evals import TokenStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
HOOK = "blocks.1.hook_resid_post"


def saelens_folder(path, *, d_in=128, metadata=None):
    """A TopK SAE made and saved by sae_lens, scaled to suit the embedded model's residual stream."""
    ref = make_saelens_sae("topk", d_in=d_in, d_sae=512, metadata={"hook_name": HOOK} | (metadata or {}))
    with torch.no_grad():
        ref.W_dec.mul_(0.05)
        ref.W_enc.mul_(0.2)
    ref.save_model(path)
    return ref


def test_eval_of_a_saelens_folder_equals_saelens_run_evals(tmp_path, capsys):
    from sae_lens.evals import get_eval_everything_config
    from sae_lens.evals import run_evals as saelens_run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    import jsae
    from bridge.cli import main
    from bridge.model import load_model
    from bridge.runner import eval_run_config, eval_token_batches

    ref = saelens_folder(tmp_path / "sae")
    assert main(["eval", str(tmp_path / "sae"), "--batches", "2", "--batch-size", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object

    model = load_model("embedded")
    cfg = eval_run_config(jsae.SAE.load_from_disk(tmp_path / "sae"), n_eval_batches=2, eval_batch_size_prompts=8)
    assert cfg.model_name == "embedded" and cfg.dataset_path == "stdlib"  # the metadata names neither
    store = TokenStore(eval_token_batches(cfg, model))
    want, _ = saelens_run_evals(ref, store, model, ActivationScaler(),
                                get_eval_everything_config(n_eval_reconstruction_batches=2,
                                                           n_eval_sparsity_variance_batches=2))
    for group, values in want.items():
        for name, value in values.items():
            assert got[group][name] == pytest.approx(value, rel=1e-4, abs=1e-7), f"{group}/{name}"
    assert 0 < got["sparsity"]["l0"] <= 6  # k = 6
    assert 0 <= got["features"]["dead_features"] <= 512


def test_eval_prints_a_readable_table(tmp_path, capsys):
    from bridge.cli import main

    saelens_folder(tmp_path / "sae")
    assert main(["eval", str(tmp_path / "sae"), "--batches", "1", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "model_performance_preservation:" in out and "ce_loss_score" in out and "explained_variance" in out


@pytest.mark.parametrize(("metadata", "d_in", "message"), [
    ({"hook_name": "blocks.9.hook_resid_pre"}, 128, "'blocks.9.hook_resid_pre' is not a hook point"),
    ({}, 64, "d_in=64 does not match 'blocks.1.hook_resid_post'"),
    ({"hook_name": None}, 128, "--hook"),
])
def test_eval_bad_input_is_a_clear_error(tmp_path, capsys, metadata, d_in, message):
    from bridge.cli import main

    saelens_folder(tmp_path / "sae", d_in=d_in, metadata=metadata)
    assert main(["eval", str(tmp_path / "sae"), "--batches", "1", "--batch-size", "4", "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_eval_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    from bridge.cli import main

    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def strict_json(text: str):
    """json.loads that refuses the bare NaN / Infinity Python's json writes and no JSON parser accepts."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_eval_of_non_finite_weights_is_an_error_not_nan_metrics(tmp_path, capsys):
    import numpy as np

    import jsae
    from bridge.cli import main

    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=128, d_sae=256, k=8, metadata=jsae.Metadata(hook_name=HOOK)),
                               seed=0)
    w_dec = np.array(sae.params["W_dec"])
    w_dec[3, 5] = np.nan
    sae = jsae.SAE(sae.cfg, dict(sae.params) | {"W_dec": w_dec})
    sae.save_model(tmp_path / "sae")
    for extra in (["--json"], [], ["--dry-run"]):
        assert main(["eval", str(tmp_path / "sae"), "--batches", "1", "--batch-size", "4", *extra]) == 2
        captured = capsys.readouterr()
        assert "jsae eval: error:" in captured.err and "not finite" in captured.err and "W_dec: 1 of" in captured.err
        assert "NaN" not in captured.out and "nan" not in captured.out


def test_eval_json_writes_non_finite_metrics_as_null(tmp_path, capsys, monkeypatch):
    import bridge.eval_run
    from bridge.cli import build_parser, main

    saelens_folder(tmp_path / "sae")
    metrics = {"reconstruction_quality": {"explained_variance": float("nan"), "mse": 0.5},
               "shrinkage": {"l2_ratio": float("inf")}, "features": {"dead_features": 3}}
    monkeypatch.setattr(bridge.eval_run, "evaluate_sae", lambda sae, cfg, verbose=False: (metrics, {}))
    assert main(["eval", str(tmp_path / "sae"), "--batches", "1", "--batch-size", "4", "--json"]) == 0
    got = strict_json(capsys.readouterr().out)
    assert got == {"reconstruction_quality": {"explained_variance": None, "mse": 0.5}, "shrinkage": {"l2_ratio": None},
                   "features": {"dead_features": 3}}
    eval_help = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "NaN or infinite is null" in " ".join(eval_help.split())


@pytest.mark.parametrize(("args", "message"), [(["--batches", "0"], "--batches) must be >= 1, got 0"),
                                               (["--batch-size", "0"], "--batch-size) must be >= 1, got 0")])
def test_eval_of_no_batches_is_a_clear_error(tmp_path, capsys, args, message):
    from bridge.cli import main

    saelens_folder(tmp_path / "sae")
    assert main(["eval", str(tmp_path / "sae"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "eval_batch_size_prompts" not in err
