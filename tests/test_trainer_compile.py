"""Trainer.fit(batch_dtype=...) compiles the step before drawing the first batch, and only once."""

from __future__ import annotations

import logging

import jax
import numpy as np
from train_helpers import activation_batches

import jsae

D_IN, D_SAE, BATCH, STEPS = 16, 64, 48, 4
BATCH_TYPE = f"float32[{BATCH},{D_IN}]"  # the batch's shape in JAX's compile log (no parameter has it)


class Batches:
    """Batches that note, at the first draw, how many step compilations the log showed so far."""

    def __init__(self, records):
        self.records, self.data, self.compiles_at_first_draw = records, activation_batches(STEPS, BATCH, D_IN), None

    def __iter__(self):
        return self

    def __next__(self):
        if self.compiles_at_first_draw is None:
            self.compiles_at_first_draw = step_compiles(self.records)
        if not self.data:
            raise StopIteration
        return self.data.pop(0)


def step_compiles(records) -> int:
    return sum(1 for r in records if r.getMessage().startswith("Compiling") and BATCH_TYPE in r.getMessage())


def fit(batch_dtype, caplog):
    cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
                           total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, progress_bar=False)
    batches = Batches(caplog.records)
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        sae = jsae.Trainer(cfg).fit(batches, batch_dtype=batch_dtype)
    return sae, batches, step_compiles(caplog.records)


def test_step_compiled_before_the_first_batch_and_reused(caplog):
    sae, batches, total = fit("float32", caplog)
    assert batches.compiles_at_first_draw == 1 and total == 1
    caplog.clear()
    plain, batches, total = fit(None, caplog)
    assert batches.compiles_at_first_draw == 0 and total == 1
    for name in plain.params:
        np.testing.assert_array_equal(np.asarray(sae.params[name]), np.asarray(plain.params[name]))


def test_another_batch_dtype_only_costs_a_second_compile(caplog):
    sae, batches, total = fit("bfloat16", caplog)
    assert batches.compiles_at_first_draw == 0  # compiled for bfloat16[48,16], not float32
    assert total == 1 and sae.params["W_enc"].shape == (D_IN, D_SAE)
