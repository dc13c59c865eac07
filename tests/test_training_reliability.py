"""Runs that must not lose work or write wrong results: resume refuses another run naming each changed
field, a fresh run owns its checkpoint folder, unreadable checkpoints are passed over, no non-finite
SAE is saved, every output path is checked before the first step, and a signal during the final
evaluation stops the run after saving the SAE."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import activation_batches

import jsae
from jsae.io import read_safetensors

D_IN, D_SAE, BATCH, STEPS = 8, 32, 32, 6


def cfg(tmp_path, **kw):
    sae = kw.pop("sae", None) or jsae.TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, metadata=jsae.Metadata(hook_name="blocks.0.hook_resid_pre", model_name="m"))
    base = dict(total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, n_devices=1, progress_bar=False,
                output_path=str(tmp_path / "sae"), checkpoint_path=str(tmp_path / "ckpt"), checkpoint_every_n_steps=2)
    return jsae.TrainConfig(sae=sae, **(base | kw))


def data(steps=STEPS):
    return activation_batches(steps, BATCH, D_IN)


def dying(batches, at: int):
    """The batches, raising at batch `at` (a crash mid-run)."""
    for i, batch in enumerate(batches):
        if i == at:
            raise RuntimeError("the data source died")
        yield batch


def crash(run_cfg, at=5):
    with pytest.raises(RuntimeError, match="died"):
        jsae.Trainer(run_cfg).fit(dying(data(), at))


@pytest.mark.parametrize("change,field", [
    ({"hook_name": "blocks.1.hook_resid_pre"}, "sae.metadata.hook_name"),
    ({"model_name": "other"}, "sae.metadata.model_name"),
    ({"k": 6}, "sae.k"),
])
def test_resume_refuses_another_run_naming_the_changed_field(tmp_path, change, field):
    crash(cfg(tmp_path))
    first = cfg(tmp_path).sae
    if "k" in change:
        sae = first.replace(k=change["k"])
    else:
        sae = first.replace(metadata=first.metadata.replace(**change))
    with pytest.raises(jsae.ConfigError, match=rf"changed: {field}\)"):
        jsae.Trainer(cfg(tmp_path, sae=sae)).fit(iter(data()))


def test_a_fresh_run_refuses_a_checkpoint_folder_holding_another_run(tmp_path):
    crash(cfg(tmp_path))
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    with pytest.raises(jsae.ConfigError, match="holds checkpoints of an earlier run.*resume is false"):
        jsae.Trainer(cfg(tmp_path, resume=False)).fit(iter(data()))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert not (tmp_path / "sae" / "sae_weights.safetensors").exists()


def test_an_unreadable_latest_checkpoint_is_passed_over(tmp_path):
    jsae.Trainer(cfg(tmp_path / "whole")).fit(iter(data()))
    crash(cfg(tmp_path))  # checkpoints at batches 2 and 4
    latest = tmp_path / "ckpt" / "4"
    for path in latest.rglob("*"):
        if path.is_file() and path.suffix != ".json":
            path.write_bytes(b"")  # cut short
    with pytest.warns(RuntimeWarning, match="could not be read.*resuming from step 2"):
        jsae.Trainer(cfg(tmp_path)).fit(iter(data()))
    want, got = (read_safetensors(p / "sae" / "sae_weights.safetensors") for p in (tmp_path / "whole", tmp_path))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])  # bitwise the uninterrupted run


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    crash(cfg(tmp_path))
    for step in ("2", "4"):
        shutil.rmtree(tmp_path / "ckpt" / step / "state")
    with pytest.raises(jsae.ConfigError, match=r"none of its checkpoints \(steps \[2, 4\]\) can be read"):
        jsae.Trainer(cfg(tmp_path)).fit(iter(data()))


def test_a_non_finite_norm_estimate_stops_before_training(tmp_path):
    sae = jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in")
    batches = data(STEPS + 2)
    batches[0][3, 1] = np.nan
    run_cfg = cfg(tmp_path, sae=sae, on_nonfinite="skip", n_batches_for_norm_estimate=1, checkpoint_path=None)
    # with on_nonfinite: skip the bad batch is left out of the estimate ...
    with pytest.raises(jsae.InputError, match="norm estimate over the first 1 batches is not finite"):
        jsae.Trainer(run_cfg).fit(iter(batches))
    assert not (tmp_path / "sae" / "sae_weights.safetensors").exists()
    # ... and data of zeros alone cannot be scaled either
    zeros = [np.zeros((BATCH, D_IN), np.float32)] * (STEPS + 1)
    with pytest.raises(jsae.InputError, match="not finite"):
        jsae.Trainer(run_cfg.replace(on_nonfinite="error")).fit(iter(zeros))


def test_a_skipped_bad_batch_leaves_the_estimate_to_the_good_ones(tmp_path):
    sae = jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in")
    batches = data(STEPS + 2)
    batches[1][3, 1] = np.nan
    run_cfg = cfg(tmp_path, sae=sae, on_nonfinite="skip", n_batches_for_norm_estimate=2, checkpoint_path=None)
    saved = jsae.Trainer(run_cfg).fit(iter(batches))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in saved.params.values())


@pytest.mark.parametrize("field", ["output_path", "checkpoint_path", "log_path"])
def test_every_output_path_is_checked_before_the_first_step(tmp_path, field):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = {"output_path": str(blocker), "checkpoint_path": str(blocker), "log_path": str(tmp_path)}[field]
    steps = []

    def counted():
        for batch in data():
            steps.append(1)
            yield batch

    with pytest.raises(jsae.ConfigError, match=f"TrainConfig.{field}"):
        jsae.Trainer(cfg(tmp_path, **{field: bad})).fit(counted())
    assert not steps  # refused before any batch was drawn
    under = str(blocker / "sub")
    with pytest.raises(jsae.ConfigError, match="which is a file"):
        jsae.Trainer(cfg(tmp_path, output_path=under)).fit(counted())


def test_a_signal_during_the_final_evaluation_stops_after_saving(tmp_path):
    calls = []

    def evaluator(sae):
        calls.append(1)
        if len(calls) == 2:  # the final evaluation (the first ran at step 3)
            raise KeyboardInterrupt
        return {"l0": 1.0}

    run_cfg = cfg(tmp_path, eval_every_n_steps=3, checkpoint_path=None)
    with pytest.raises(jsae.TrainingInterrupted, match="final evaluation stopped"):
        jsae.Trainer(run_cfg).fit(iter(data()), evaluator=evaluator)
    saved = jsae.SAE.load_from_disk(Path(tmp_path) / "sae")
    assert saved.cfg.metadata.eval_metrics is None and saved.cfg.metadata.l0 is not None


def test_an_sae_too_large_for_the_device_is_refused_before_allocating():
    sae = jsae.TopKTrainingSAEConfig(d_in=768, d_sae=1 << 23, k=32)  # ~150 GiB of parameters and Adam moments
    with pytest.raises(jsae.ConfigError, match=r"needs at least [0-9.]+ GiB on each device \([0-9.]+ GiB of "
                                               r"parameters and Adam moments.*model_axis_size"):
        jsae.Trainer(jsae.TrainConfig(sae=sae, total_training_tokens=4096, train_batch_size_tokens=4096, n_devices=1))


def test_complex_activations_are_refused(tmp_path):
    batches = [b.astype(np.complex64) for b in data()]
    with pytest.raises(jsae.InputError, match="real floating-point numbers, got dtype complex64"):
        jsae.Trainer(cfg(tmp_path, checkpoint_path=None)).fit(iter(batches))


def test_weights_left_non_finite_are_refused_naming_each_tensor_and_not_saved(tmp_path):
    """Every batch skipped (on_nonfinite: skip) leaves a NaN start where it was: the run refuses to
    save that SAE and names the tensor and how many of its values are bad."""
    run_cfg = cfg(tmp_path, on_nonfinite="skip", checkpoint_path=None)
    params = {k: np.asarray(v) for k, v in jsae.Trainer(run_cfg).init_state().params.items()}
    params["b_dec"] = params["b_dec"].copy()
    params["b_dec"][:3] = np.nan
    with pytest.raises(jsae.InputError, match=rf"non-finite values in b_dec: 3 of {D_IN}; the SAE was not saved"):
        jsae.Trainer(run_cfg).fit(data(), params=params)
    assert not (tmp_path / "sae" / "sae_weights.safetensors").exists()  # (its metrics.jsonl is there)
