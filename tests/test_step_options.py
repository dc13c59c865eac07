"""XLA compiler options of the training step: used by the trainer, and they change no result."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from train_helpers import activation_batches, relative

import jsae
from jsae.training import step as step_module

D_IN, D_SAE, BATCH, STEPS = 32, 256, 256, 20

CONFIGS = {
    "standard": jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=1.0),
    "topk": jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, topk_implementation="dense"),
    "jumprelu": jsae.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.3),
}


def train_cfg(sae_cfg):
    return jsae.TrainConfig(sae=sae_cfg, total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH,
                            lr=3e-3, dead_feature_window=5, progress_bar=False)


def test_cpu_options_turn_off_ynnpack_fusions():
    options = jsae.step_compiler_options("cpu")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    cfg = train_cfg(CONFIGS["standard"])
    state, batch = jsae.init_train_state(cfg), activation_batches(1, BATCH, D_IN)[0]
    with_options = jax.jit(jsae.make_train_step(cfg), compiler_options=options).lower(state, batch).compile()
    assert "ynn_fusion" not in with_options.as_text()
    # The trainer compiles its step with them.
    trainer = jsae.Trainer(cfg)
    assert "ynn_fusion" not in trainer.step_fn.lower(trainer._fresh_state(), batch).compile().as_text()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_step_with_options_trains_the_same_sae(arch):
    cfg = train_cfg(CONFIGS[arch])
    batches = activation_batches(STEPS, BATCH, D_IN, seed=3)
    states = []
    for options in (None, jsae.step_compiler_options("cpu")):
        step = jax.jit(jsae.make_train_step(cfg), compiler_options=options)
        state = jsae.init_train_state(cfg)
        for batch in batches:
            state, _ = step(state, batch)
        states.append(state)
    plain, tuned = states
    for name, ref in plain.params.items():
        assert relative(tuned.params[name], ref) <= 1e-5, name
    np.testing.assert_array_equal(np.asarray(tuned.steps_since_fired), np.asarray(plain.steps_since_fired))


def test_an_option_this_jaxlib_lacks_is_left_out(monkeypatch):
    monkeypatch.setitem(step_module.STEP_COMPILER_OPTIONS, "cpu", {"xla_cpu_no_such_option": "1"})
    step_module.step_compiler_options.cache_clear()
    try:
        assert step_module.step_compiler_options("cpu") is None
    finally:
        monkeypatch.undo()
        step_module.step_compiler_options.cache_clear()
    assert step_module.step_compiler_options("cpu") is not None
