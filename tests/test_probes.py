"""A representative dozen of bench/probes.py's probes through its harness: bad config values, a corrupt SAE
folder, NaN weights and data, bad token ids, a signal during training then resume. None may be a silent
wrong result, a crash or lost work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

SUBSET = [
    "field:train.lr=nan", "field:sae.k=negative", "cli:set_into_scalar", "yaml:duplicate_key",
    "load:w:truncated", "load:w:nan", "load:cfg:k_above_d_sae",
    "api:encode_wrong_width", "api:nonfinite_skip_nan_batch_5", "api:nonfinite_error_inf_batch_5",
    "tokens:oov.npy", "signal:SIGTERM_mid_training",
]


@pytest.mark.slow
def test_a_dozen_probes_find_no_silent_result_crash_or_lost_work(tmp_path):
    import probes
    from probe_table import all_probes

    table = {p.name: p for p in all_probes()}
    results = probes.run_all([table[name] for name in SUBSET], jobs=2, timeout=300, work=tmp_path, verbose=False)
    report = probes.summary(results)
    assert len(results) == len(SUBSET)
    assert not [r for r in results if r["class"] in probes.BAD + ("untested",)], report
    assert {r["name"]: r["class"] for r in results}["signal:SIGTERM_mid_training"] == "ok", report
    assert all(r["class"] == "clear" for r in results if table[r["name"]].expect == "error"), report
