"""The python_api probes of bench/probe_table.py: a few statements each against jsae's public API (run by
bench/probes.py with jsae, np, D = the probe's folder and A = the shared assets folder in scope). A
statement list that finishes prints "WRONG: ..." itself when its result is wrong."""

from __future__ import annotations

from probe_table import Probe

SAE = "sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4), seed=0)\n"
X = "x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)\n"
FINITE = "if not np.isfinite(np.asarray(out)).all():\n    print('WRONG: non-finite output')\n"

# jsae.train on in-memory activations: 12 steps of 64 rows of 16 dims
TRAIN = """
from jsae.training.data import ArrayBatches
data = (np.random.default_rng(3).normal(size=(768, 16)) * 2 + 0.5).astype(np.float32)
{poison}
cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4{sae_kw}), total_training_tokens=768,
                       train_batch_size_tokens=64, progress_bar=False, n_devices=1{kw})
sae = jsae.train(cfg, ArrayBatches(data, 64, seed=1))
params = {{k: np.asarray(v) for k, v in sae.params.items()}}
if not all(np.isfinite(v).all() for v in params.values()):
    print("WRONG: the trained SAE holds non-finite weights")
"""


def _train(name, poison="", kw="", sae_kw="", expect="error", names=()):
    return Probe(f"api:{name}", "python_api", code=TRAIN.format(poison=poison, kw=kw, sae_kw=sae_kw),
                 expect=expect, names=names)


NONFINITE = {
    "nan_batch_5": "data[5 * 64 + 3, 2] = np.nan",
    "inf_batch_5": "data[5 * 64 + 3, 2] = np.inf",
    "nan_first_batch": "data[3, 2] = np.nan",
    "all_nan": "data[:] = np.nan",
    "huge_values": "data[5 * 64:6 * 64] = 3e38",
}

API_PROBES = [
    Probe("api:encode_wrong_width", "python_api", code=SAE + "sae.encode(np.zeros((4, 17), np.float32))",
          names=("d_in",)),
    # without check_finite (it costs a host sync) NaN propagates, but only within its own row
    Probe("api:encode_nan", "python_api", code=SAE + X + "x[0, 0] = np.nan\nout = sae.encode(x)[1:]\n" + FINITE,
          expect="any"),
    Probe("api:encode_nan_checked", "python_api", code=SAE + "sae.check_finite = True\n" + X + "x[0, 0] = np.nan\nsae.encode(x)",
          names=("non-finite",)),
    Probe("api:encode_int", "python_api", code=SAE + "out = sae.encode(np.ones((4, 16), np.int32))\n" + FINITE,
          expect="any"),
    Probe("api:encode_empty_batch", "python_api", code=SAE + "out = sae.encode(np.zeros((0, 16), np.float32))\n"
          "assert np.asarray(out).shape == (0, 32)", expect="any"),
    Probe("api:encode_3d", "python_api", code=SAE + "out = sae.encode(np.ones((2, 3, 16), np.float32))\n"
          "assert np.asarray(out).shape == (2, 3, 32)\n" + FINITE, expect="any"),
    Probe("api:encode_1d", "python_api", code=SAE + "out = sae.encode(np.ones((16,), np.float32))\n" + FINITE,
          expect="any"),
    Probe("api:encode_float64", "python_api", code=SAE + X + "out = sae.encode(x.astype(np.float64))\n" + FINITE,
          expect="any"),
    Probe("api:encode_a_list", "python_api", code=SAE + "out = sae.encode([[1.0] * 16])\n" + FINITE, expect="any"),
    Probe("api:encode_a_string", "python_api", code=SAE + "sae.encode('hello')", names=("input", "numeric")),
    Probe("api:decode_wrong_width", "python_api", code=SAE + "sae.decode(np.zeros((4, 31), np.float32))",
          names=("d_sae",)),
    Probe("api:d_sae_zero", "python_api", code="jsae.TopKSAEConfig(d_in=16, d_sae=0, k=1)", names=("d_sae",)),
    Probe("api:k_zero", "python_api", code="jsae.TopKSAEConfig(d_in=16, d_sae=32, k=0)", names=("k",)),
    Probe("api:d_in_float", "python_api", code="jsae.StandardSAEConfig(d_in=16.0, d_sae=32)", names=("d_in",)),
    Probe("api:d_in_string", "python_api", code="jsae.StandardSAEConfig(d_in='16', d_sae=32)", names=("d_in",)),
    Probe("api:dtype_bogus", "python_api", code="jsae.StandardSAEConfig(d_in=16, d_sae=32, dtype='float33')",
          names=("dtype",)),
    Probe("api:from_config_seed_string", "python_api",
          code="jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4), seed='x')", names=("seed",)),
    Probe("api:save_into_a_file", "python_api", code=SAE + "(D / 'f').write_text('x')\nsae.save_model(str(D / 'f'))",
          names=("f",)),
    Probe("api:save_then_load_equal", "python_api", code=SAE + X + "sae.save_model(str(D / 's'))\n"
          "back = jsae.SAE.load_from_disk(str(D / 's'))\n"
          "if not np.array_equal(np.asarray(back.encode(x)), np.asarray(sae.encode(x))):\n"
          "    print('WRONG: the saved SAE loads with other outputs')", expect="ok"),
    Probe("api:load_missing", "python_api", code="jsae.SAE.load_from_disk(str(D / 'none'))", names=("none",)),
    Probe("api:train_tokens_below_a_batch", "python_api",
          code="jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4), total_training_tokens=10, "
               "train_batch_size_tokens=64)", names=("total_training_tokens",)),
    Probe("api:train_batch_zero", "python_api",
          code="jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4), total_training_tokens=640, "
               "train_batch_size_tokens=0)", names=("train_batch_size_tokens",)),
    Probe("api:train_lr_nan", "python_api",
          code="jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4), total_training_tokens=640, "
               "train_batch_size_tokens=64, lr=float('nan'))", names=("lr",)),
    _train("train_data_wrong_width", poison="data = data[:, :15].copy()", names=("16",)),
    _train("train_data_too_short", poison="data = data[:100]", expect="any"),
    _train("train_data_float64", poison="data = data.astype(np.float64)", expect="ok"),
    _train("train_data_int", poison="data = data.astype(np.int32)", expect="any"),
    _train("train_valid", expect="ok"),
    _train("train_normalize_nan_first_batch", poison=NONFINITE["nan_first_batch"],
           sae_kw=", normalize_activations='expected_average_only_in'", kw=", on_nonfinite='skip'", expect="any"),
] + [
    _train(f"nonfinite_{mode}_{what}", poison=poison, kw=f", on_nonfinite='{mode}'",
           expect="error" if mode == "error" else "any", names=("non-finite",) if mode == "error" else ())
    for mode in ("error", "skip") for what, poison in NONFINITE.items()
    if not (mode == "error" and what == "huge_values")
] + [_train("nonfinite_error_huge_values", poison=NONFINITE["huge_values"], expect="any")]
