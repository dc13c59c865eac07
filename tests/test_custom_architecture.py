"""An architecture defined here, outside jsae/, trains through the normal trainer: alone, as a sweep of
two, feature-sharded over forced devices, and saves a folder that loads back. Generic code asks the
architecture (its training state, per-latent axes and saved form) and never names one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import activation_batches, relative

import jsae
from jsae.saes import TrainingArchitecture, register_training_architecture
from jsae.saes._base import decoder_row_norms, training_hidden_pre, training_module_cfg
from jsae.saes._training import COMMON_LATENT_AXES, TrainingFields, finish, mse
from jsae.saes.standard import StandardSAE, StandardSAEConfig
from jsae.training.sweep import Sweep, sweep_configs

D_IN, D_SAE, BATCH, STEPS = 16, 64, 64, 12


@dataclasses.dataclass(frozen=True, kw_only=True)
class GainReLUTrainingSAEConfig(StandardSAEConfig, TrainingFields):
    """A ReLU SAE with a learned per-latent gain: f = relu(h) · exp(log_gain). Saved as a standard SAE
    (the gain folded into W_enc and b_enc, exact since exp(log_gain) > 0)."""

    architecture = "gain_relu_for_tests"
    inference_architecture = "standard"

    l1_coefficient: float = 1.0

    def coefficients(self):
        return {"l1": (self.l1_coefficient, 0)}


def forward(params, x, *, cfg, coefficients, dead_mask, ops):
    module = StandardSAE(training_module_cfg(cfg))
    hidden_pre, state = training_hidden_pre(module, params, x)
    feature_acts = jax.nn.relu(hidden_pre) * jnp.exp(params["log_gain"])
    sae_out = module.apply({"params": params}, feature_acts, state, method="decode")
    l1 = coefficients["l1"] * jnp.mean(jnp.sum(feature_acts * decoder_row_norms(params["W_dec"]), axis=-1))
    return finish({"mse_loss": mse(sae_out, x), "l1_loss": l1}, feature_acts, hidden_pre, sae_out)


def update_state(state, out, cfg, axis_name):
    """An EMA of the batch's L0: the architecture's own training state."""
    l0 = jnp.mean(jnp.sum(out.feature_acts > 0, axis=-1).astype(jnp.float32))
    if axis_name is not None:
        l0 = jax.lax.pmean(l0, axis_name)
    return {"l0_ema": 0.9 * state["l0_ema"] + 0.1 * l0}


def to_inference(params, state, cfg, input_scale):
    gain = jnp.exp(params["log_gain"])
    return {"W_enc": params["W_enc"] * gain, "b_enc": params["b_enc"] * gain, "W_dec": params["W_dec"],
            "b_dec": params["b_dec"]}


ARCH = TrainingArchitecture(
    "gain_relu_for_tests", GainReLUTrainingSAEConfig, forward,
    init_extra=lambda cfg: {"log_gain": jnp.full((cfg.d_sae,), 0.1, jnp.float32)},
    init_state=lambda cfg: {"l0_ema": jnp.zeros((), jnp.float32)},
    update_state=update_state,
    state_metrics=lambda state, cfg: {"metrics/l0_ema": state["l0_ema"]},
    latent_axes={**COMMON_LATENT_AXES, "log_gain": -1},
    to_inference=to_inference,
)
register_training_architecture(ARCH)


def train_cfg(**kw):
    sae = GainReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.05)
    return jsae.TrainConfig(sae=sae, total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, lr=3e-3,
                            progress_bar=False, **kw)


def batches(seed=0):
    return activation_batches(STEPS, BATCH, D_IN, seed=seed)


def assert_saved_sae_is_the_trained_one(folder, state, x):
    """The saved standard SAE computes what the trained architecture computes."""
    sae = jsae.SAE.load_from_disk(folder)
    assert sae.cfg.architecture == "standard"
    assert sae.cfg.metadata.training_architecture == "gain_relu_for_tests"
    params = jax.device_get(state.params)
    want = forward(params, x, cfg=train_cfg().sae, coefficients={"l1": 0.0}, dead_mask=None, ops=None)
    assert relative(sae.encode(x), want.feature_acts) <= 1e-5
    assert relative(sae(x), want.sae_out) <= 1e-5


def test_trains_and_saves_a_folder_that_loads_back(tmp_path):
    trainer = jsae.Trainer(train_cfg(n_devices=1, output_path=str(tmp_path / "sae")))
    trainer.fit(iter(batches()))
    assert int(trainer.state.step) == STEPS
    assert float(trainer.state.extra["l0_ema"]) > 0  # its own state was updated by every step
    assert not np.allclose(np.asarray(trainer.state.params["log_gain"]), 0.1)  # its own parameter trained
    assert_saved_sae_is_the_trained_one(tmp_path / "sae", trainer.state, batches(1)[0])
    assert jsae.SAE.load_from_disk(tmp_path / "sae").cfg.metadata.jsae_execution == trainer.plan.to_dict()


def test_a_sweep_of_two_equals_two_runs(tmp_path):
    base = train_cfg(n_devices=1, output_path=str(tmp_path / "sweep"))
    members = sweep_configs(base, {"lr": [1e-3, 3e-3]})
    saes = jsae.Trainer(base, sweep=Sweep(members, ["a", "b"])).fit(iter(batches()))
    for member, sae in zip(members, saes, strict=True):
        alone = jsae.Trainer(member.replace(output_path=None)).fit(iter(batches()))
        for name, value in alone.params.items():
            assert relative(sae.params[name], value) <= 1e-5, name
    assert jsae.SAE.load_from_disk(tmp_path / "sweep" / "b").cfg.architecture == "standard"


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced host) devices")
def test_feature_sharded_equals_one_device(tmp_path):
    single = jsae.Trainer(train_cfg(n_devices=1))
    single.fit(iter(batches()))
    sharded = jsae.Trainer(train_cfg(model_axis_size=4, output_path=str(tmp_path / "sharded")))
    sharded.fit(iter(batches()))
    gain = sharded.state.params["log_gain"]
    assert gain.sharding.spec == jax.sharding.PartitionSpec("model")  # its per-latent axis split with the latents
    for name, value in single.state.params.items():
        assert relative(sharded.state.params[name], value) <= 1e-5, name
    assert float(sharded.state.extra["l0_ema"]) == pytest.approx(float(single.state.extra["l0_ema"]), rel=1e-5)
    assert_saved_sae_is_the_trained_one(tmp_path / "sharded", single.state, batches(1)[0])
