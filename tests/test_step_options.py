"""XLA compiler options of the training step: used by the trainer, and they change no result."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from train_helpers import activation_batches, relative

import jsae
from jsae import backends
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
    monkeypatch.setitem(backends.STEP_COMPILER_OPTIONS, "cpu", {"xla_cpu_no_such_option": "1"})
    backends.step_compiler_options.cache_clear()
    try:
        assert backends.step_compiler_options("cpu") is None
    finally:
        monkeypatch.undo()
        backends.step_compiler_options.cache_clear()
    assert backends.step_compiler_options("cpu") is not None


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_the_step_branched_on_dead_latents_trains_the_same_sae(implementation, monkeypatch):
    """make_train_step branches once on whether any latent is dead (the none-dead program without
    the aux-k loss's branches); through both regimes it trains what the one-program step trains."""
    sae = jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, topk_implementation=implementation)
    cfg = train_cfg(sae).replace(dead_feature_window=2)
    def branches(cfg):
        return jsae.resolve_plan(cfg).dead_latent_branch

    assert not branches(cfg)  # too narrow to pay for two programs
    assert branches(cfg.replace(sae=sae.replace(d_in=768, d_sae=4096)))
    assert not branches(cfg.replace(sae=jsae.StandardTrainingSAEConfig(d_in=768, d_sae=4096, l1_coefficient=1.0)))
    monkeypatch.setattr(backends, "DEAD_BRANCH_MIN_WEIGHTS", 0)
    plan = jsae.resolve_plan(cfg)
    assert plan.dead_latent_branch
    one_program = step_module.build_step(cfg, plan=plan)
    hyper = step_module.hyperparameters(cfg)
    steps = {"branched": jax.jit(jsae.make_train_step(cfg, plan=plan)),
             "one program": jax.jit(lambda state, batch: one_program(state, hyper, batch))}
    # Few, narrow batches: many latents never fire, so they are dead from step 3 on.
    batches = activation_batches(STEPS, 16, D_IN, seed=5)
    states = {name: jsae.init_train_state(cfg.replace(train_batch_size_tokens=16)) for name in steps}
    regimes = set()
    for batch in batches:
        regimes.add(bool(np.any(np.asarray(states["branched"].steps_since_fired) > cfg.dead_feature_window)))
        losses = {}
        for name, step in steps.items():
            states[name], metrics = step(states[name], batch)
            losses[name] = float(metrics["losses/auxiliary_reconstruction_loss"])
        assert losses["branched"] == pytest.approx(losses["one program"], rel=1e-5, abs=1e-7)
    assert regimes == {False, True}  # both programs ran
    for name, ref in states["one program"].params.items():
        assert relative(states["branched"].params[name], ref) <= 1e-5, name
    np.testing.assert_array_equal(np.asarray(states["branched"].steps_since_fired),
                                  np.asarray(states["one program"].steps_since_fired))
