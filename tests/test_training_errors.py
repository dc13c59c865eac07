"""Bad training input: clear errors naming the field; NaN batches never reach the parameters."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jsae


def small_cfg(**kw):
    kw = dict(total_training_tokens=10 * 32, train_batch_size_tokens=32, lr=1e-3, progress_bar=False,
              n_devices=1) | kw
    return jsae.TrainConfig(sae=jsae.StandardTrainingSAEConfig(d_in=8, d_sae=32), **kw)


def data(n=10, bad_at=None, value=np.nan):
    rng = np.random.default_rng(0)
    out = [rng.normal(size=(32, 8)).astype(np.float32) for _ in range(n)]
    if bad_at is not None:
        out[bad_at][3, 2] = value
    return out


def test_nan_batch_is_refused_and_params_stay_finite():
    trainer = jsae.Trainer(small_cfg())
    with pytest.raises(jsae.InputError, match=r"batch of step 4 holds NaN/inf.*on_nonfinite: skip"):
        trainer.fit(iter(data(bad_at=4)))


def test_inf_batch_is_skipped_and_counted_when_configured():
    trainer = jsae.Trainer(small_cfg(on_nonfinite="skip"))
    sae = trainer.fit(iter(data(bad_at=6, value=np.inf)))
    assert int(trainer.state.skipped_batches) == 1
    assert int(trainer.state.step) == 9  # the skipped batch took no optimiser step
    assert all(bool(jax.numpy.all(jax.numpy.isfinite(v))) for v in sae.params.values())
    clean = jsae.Trainer(small_cfg(on_nonfinite="skip", total_training_tokens=9 * 32))
    batches = data()
    clean.fit(iter(batches[:6] + batches[7:]))
    for name, value in clean.state.params.items():
        np.testing.assert_array_equal(np.asarray(trainer.state.params[name]), np.asarray(value))


def test_batch_not_divisible_by_devices():
    if jax.device_count() < 3:
        pytest.skip("needs 3 devices")
    with pytest.raises(jsae.ConfigError, match=r"train_batch_size_tokens=32 is not divisible by the 3 devices"):
        jsae.Trainer(small_cfg(n_devices=3))


def test_more_devices_than_exist():
    with pytest.raises(jsae.ConfigError, match=r"n_devices=999, but only"):
        jsae.Trainer(small_cfg(n_devices=999))


def test_d_in_contradicts_config():
    trainer = jsae.Trainer(small_cfg())
    with pytest.raises(jsae.InputError, match=r"d_in=8.*got \(32, 9\)"):
        trainer.fit(iter([np.zeros((32, 9), np.float32)] * 10))


def test_wrong_batch_size():
    trainer = jsae.Trainer(small_cfg())
    with pytest.raises(jsae.InputError, match=r"expected 32 tokens per process.*got 31"):
        trainer.fit(iter([np.zeros((31, 8), np.float32)] * 10))


def test_data_running_out():
    trainer = jsae.Trainer(small_cfg())
    with pytest.raises(jsae.InputError, match=r"data ran out at step 3 of 10"):
        trainer.fit(iter(data(3)))


@pytest.mark.parametrize(("build", "pattern"), [
    (lambda: small_cfg(lr=-1e-3), r"TrainConfig\.lr must be > 0, got -0\.001"),
    (lambda: small_cfg(lr_scheduler_name="cosine"), r"lr_scheduler_name .*'cosine'.*cosineannealing"),
    (lambda: small_cfg(total_training_tokens=10), r"total_training_tokens \(10\) is less than one batch"),
    (lambda: small_cfg(on_nonfinite="ignore"), r"on_nonfinite must be one of"),
    (lambda: small_cfg(adam_beta1=1.5), r"adam_beta1 must be in \[0, 1\)"),
    (lambda: jsae.TopKTrainingSAEConfig(d_in=8, d_sae=32, k=33), r"k must be an integer in \[1, d_sae=32\], got 33"),
    (lambda: jsae.BatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=40.0), r"BatchTopKTrainingSAEConfig\.k must be in"),
    (lambda: jsae.MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4.0, matryoshka_widths=[8, 16]),
     r"matryoshka_widths are cumulative prefix widths and must end at d_sae=32, got \[8, 16\]"),
    (lambda: jsae.MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4.0, matryoshka_widths=[16, 8, 32]),
     r"matryoshka_widths must be strictly increasing"),
    (lambda: jsae.JumpReLUTrainingSAEConfig(d_in=8, d_sae=32, jumprelu_sparsity_loss_mode="quadratic"),
     r"target_l0 must be in \(0, d_sae=32\]"),
    (lambda: jsae.JumpReLUTrainingSAEConfig(d_in=8, d_sae=32, jumprelu_bandwidth=0), r"jumprelu_bandwidth must be > 0"),
    (lambda: jsae.StandardTrainingSAEConfig(d_in=8, d_sae=32, l1_coefficient=-1), r"l1_coefficient must be a number >= 0"),
    (lambda: jsae.TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, normalize_activations="layer_norm"),
     r"normalize_activations='layer_norm' cannot be trained with the aux-k loss"),
    (lambda: jsae.TrainConfig(sae=jsae.StandardSAEConfig(d_in=8, d_sae=32), total_training_tokens=100),
     r"TrainConfig\.sae must be a training config"),
])
def test_invalid_config_values_name_the_field(build, pattern):
    with pytest.raises(jsae.ConfigError, match=pattern):
        build()


def test_config_from_dict_unknown_key_suggests_the_field():
    base = {"sae": {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4}, "total_training_tokens": 10000}
    cfg = jsae.TrainConfig.from_dict(base)
    assert cfg.sae.k == 4 and cfg.sae.rescale_acts_by_decoder_norm is True
    with pytest.raises(jsae.ConfigError, match=r"unknown key 'lrr'.*Did you mean 'lr'"):
        jsae.TrainConfig.from_dict(base | {"lrr": 1e-3})
    with pytest.raises(jsae.ConfigError, match=r"config\.sae: unknown key 'kk'.*Did you mean 'k'"):
        jsae.TrainConfig.from_dict(base | {"sae": base["sae"] | {"kk": 3}})
    with pytest.raises(jsae.ConfigError, match=r"cannot train architecture 'topkk'.*Did you mean 'topk'"):
        jsae.TrainConfig.from_dict(base | {"sae": base["sae"] | {"architecture": "topkk"}})


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = small_cfg(checkpoint_path=str(tmp_path / "ckpt"))
    jsae.Trainer(cfg).fit(iter(data()))
    with pytest.raises(jsae.ConfigError, match=r"different config \(changed: lr\)"):
        jsae.Trainer(cfg.replace(lr=2e-3)).fit(iter(data()))
    again = jsae.Trainer(cfg.replace(progress_bar=False, log_every_n_steps=3))  # cosmetic changes resume fine
    again.fit(iter(data()))
    assert int(again.state.step) == 10
