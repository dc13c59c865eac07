"""abstopk, temporal and matching_pursuit: folders sae_lens writes load in jsae and compute the same,
jsae's folders load in sae_lens, and matching pursuit's training losses and gradients equal sae_lens'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from saelens_helpers import randomize_parameters, rel_err, to_numpy

import jsae
from jsae.saes import TRAINING_ARCHITECTURES

D_IN, D_SAE = 16, 48
CASES = {
    "abstopk": ("abstopk", {"k": 5}),
    "abstopk_rescaled": ("abstopk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "temporal_topk": ("temporal", {"n_heads": 2, "bottleneck_factor": 4, "kval_topk": 6}),
    "temporal_untied_scalar": ("temporal", {"n_heads": 4, "n_attn_layers": 2, "bottleneck_factor": 2,
                                            "sae_diff_type": "relu", "tied_weights": False,
                                            "normalize_activations": "constant_scalar_rescale",
                                            "activation_normalization_factor": 0.7}),
    "temporal_tied_no_bdec": ("temporal", {"n_heads": 2, "bottleneck_factor": 4, "kval_topk": 6,
                                           "apply_b_dec_to_input": False}),
    "matching_pursuit": ("matching_pursuit", {}),
    "matching_pursuit_no_bdec_capped": ("matching_pursuit", {"apply_b_dec_to_input": False, "max_iterations": 5,
                                                             "stop_on_duplicate_support": False}),
    "matching_pursuit_layer_norm": ("matching_pursuit", {"normalize_activations": "layer_norm",
                                                         "residual_threshold": 0.5}),
}


def saelens_sae(case, seed=0):
    from sae_lens.registry import get_sae_class

    arch, extra = CASES[case]
    sae_cls, cfg_cls = get_sae_class(arch)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    randomize_parameters(sae, seed)
    sae.eval()
    return sae


def inputs(case, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 7, D_IN) if CASES[case][0] == "temporal" else (20, D_IN)
    return torch.randn(shape, generator=gen) * 2.0 + 0.3


def random_sae(cfg, seed):
    """A jsae SAE with normal random parameters (shapes from the architecture, no initialiser run)."""
    from jsae.tensors import expected_shapes

    rng = np.random.default_rng(seed)
    return jsae.SAE(cfg, {k: rng.normal(size=shape).astype(np.float32) for k, shape in expected_shapes(cfg).items()})


def outputs(sae, x):
    with torch.no_grad():
        acts = sae.encode(x)
        return acts, sae.decode(acts), sae(x)


@jax.jit
def jsae_outputs(sae, x, acts):
    """jsae's encode(x), decode(acts) and forward(x), compiled once."""
    return sae.encode(x), sae.decode(acts), sae(x)


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_folder_loads_in_jsae_and_computes_the_same(case, tmp_path):
    ref = saelens_sae(case)
    ref.save_model(tmp_path / "ref")
    sae = jsae.SAE.load_from_disk(tmp_path / "ref")
    assert sae.cfg.architecture == CASES[case][0]
    for name, value in ref.state_dict().items():
        np.testing.assert_array_equal(np.asarray(sae.params[name]), to_numpy(value), err_msg=name)
    for key, value in ref.cfg.to_dict().items():
        if key != "metadata":
            assert sae.cfg.to_dict()[key] == value, key
    x = inputs(case)
    acts, recon, out = outputs(ref, x)
    got_acts, got_recon, got_out = (np.asarray(v) for v in jsae_outputs(sae, x.numpy(), acts.numpy()))
    assert rel_err(got_acts, acts.numpy()) <= 1e-5
    assert np.array_equal(got_acts != 0, acts.numpy() != 0)  # the same latents fire
    assert rel_err(got_recon, recon.numpy()) <= 1e-5
    assert rel_err(got_out, out.numpy()) <= 1e-5


@pytest.mark.parametrize("case", ["abstopk_rescaled", "temporal_untied_scalar", "matching_pursuit"])
def test_jsae_folder_loads_in_saelens(case, tmp_path):
    from sae_lens import SAE

    ref = saelens_sae(case, seed=3)
    ref.save_model(tmp_path / "ref")
    jsae.SAE.load_from_disk(tmp_path / "ref").save_model(tmp_path / "jsae")
    back = SAE.load_from_disk(tmp_path / "jsae")
    assert back.cfg.to_dict() | {"metadata": None} == ref.cfg.to_dict() | {"metadata": None}
    x = inputs(case, seed=4)
    for got, want in zip(outputs(back, x), outputs(ref, x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_abstopk_keeps_negative_latents():
    cfg = jsae.saes.get_architecture("abstopk").config_cls(d_in=D_IN, d_sae=D_SAE, k=4)
    model = random_sae(cfg, 2)
    acts = np.asarray(jax.jit(lambda s, x: s.encode(x))(model, np.random.default_rng(0).normal(size=(50, D_IN))))
    assert (np.count_nonzero(acts, axis=-1) == 4).all() and (acts < 0).any()


def test_temporal_is_causal():
    cfg = jsae.saes.get_architecture("temporal").config_cls(d_in=D_IN, d_sae=D_SAE, n_heads=2, bottleneck_factor=4)
    sae = random_sae(cfg, 1)
    x = np.random.default_rng(1).normal(size=(2, 6, D_IN)).astype(np.float32)
    changed = x.copy()
    changed[:, 4:] += 1.0
    forward = jax.jit(lambda s, x: s(x))
    np.testing.assert_array_equal(np.asarray(forward(sae, x))[:, :4], np.asarray(forward(sae, changed))[:, :4])


# --------------------------------------------------------------------------- matching-pursuit training
TRAIN_CASES = {
    "default": {},
    "no_bdec_capped": {"apply_b_dec_to_input": False, "max_iterations": 6, "stop_on_duplicate_support": False},
    "threshold": {"residual_threshold": 2.0},
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_matching_pursuit_losses_and_gradients_match_saelens(case):
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainStepInput

    sae_cls, cfg_cls = get_sae_training_class("matching_pursuit")
    ref = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **TRAIN_CASES[case]))
    randomize_parameters(ref, 5, w_dec_floor=0.3)
    jarch = TRAINING_ARCHITECTURES["matching_pursuit"]
    cfg = jarch.config_cls(d_in=D_IN, d_sae=D_SAE, **TRAIN_CASES[case])
    params = {k: jnp.asarray(to_numpy(v)) for k, v in ref.named_parameters()}
    assert set(params) == {"W_dec", "b_dec"}

    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(6)) * 1.5 + 0.2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    out = ref.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
    out.loss.backward()

    def loss_fn(p):
        result = jarch.forward(p, jnp.asarray(x.numpy()), cfg=cfg, coefficients={}, dead_mask=jnp.asarray(dead.numpy()))
        return result.loss, result

    (loss, result), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    assert set(result.losses) == set(out.losses) == {"mse_loss"}
    assert rel_err(loss, out.loss.detach().numpy()) <= 1e-5
    assert rel_err(result.feature_acts, out.feature_acts.detach().numpy()) <= 1e-5
    for name, p in ref.named_parameters():
        assert rel_err(grads[name], p.grad.numpy()) <= 1e-4, name


def test_matching_pursuit_training_init_and_config():
    from jsae._errors import ConfigError
    from jsae.saes._training import init_training_params

    cfg_cls = TRAINING_ARCHITECTURES["matching_pursuit"].config_cls
    params = init_training_params(cfg_cls(d_in=D_IN, d_sae=D_SAE), jax.random.key(0))
    assert set(params) == {"W_dec", "b_dec"}  # tied: no W_enc, no b_enc
    np.testing.assert_allclose(np.linalg.norm(np.asarray(params["W_dec"]), axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ConfigError, match="decoder_init_norm"):
        cfg_cls(d_in=D_IN, d_sae=D_SAE, decoder_init_norm=0.1)


@pytest.mark.slow
def test_matching_pursuit_trains_in_jsae_as_in_saelens(tmp_path):
    """One step of jsae's Trainer equals one step of sae_lens' SAETrainer from the same init and batch
    (matching pursuit's discrete picks amplify float rounding afterwards, so runs are compared a step
    apart), and the trained SAE saves as a folder sae_lens loads and computes the same with."""
    import json

    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    extra, batch = {"residual_threshold": 0.5}, 64
    trainer_cfg = dict(lr=3e-3, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0)
    data = [np.random.default_rng(7).normal(size=(batch, D_IN)).astype(np.float32) + 0.4]
    torch.manual_seed(0)
    sae_cls, cfg_cls = get_sae_training_class("matching_pursuit")
    ref_sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    init = {k: to_numpy(v).copy() for k, v in ref_sae.state_dict().items()}
    ref = SAETrainer(cfg=SAETrainerConfig(total_training_samples=batch, train_batch_size_samples=batch, lr_end=3e-4,
                                          **trainer_cfg),
                     sae=ref_sae, data_provider=iter([torch.from_numpy(b) for b in data]))
    ref.fit()

    cfg = jsae.TrainConfig(sae=TRAINING_ARCHITECTURES["matching_pursuit"].config_cls(d_in=D_IN, d_sae=D_SAE, **extra),
                           total_training_tokens=batch, train_batch_size_tokens=batch, log_every_n_steps=1,
                           log_path=str(tmp_path / "m.jsonl"), progress_bar=False, n_devices=1, **trainer_cfg)
    trainer = jsae.Trainer(cfg)
    sae = trainer.fit(iter(data), params=init)
    for name, want in ref.sae.state_dict().items():
        got = np.asarray(trainer.state.params[name], np.float64)
        assert np.linalg.norm(got - to_numpy(want)) <= 1e-4 * np.linalg.norm(to_numpy(want)), name
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    losses = [row["losses/mse_loss"] for row in rows if "losses/mse_loss" in row]
    assert set(sae.params) == {"W_dec", "b_dec"} and len(losses) == 1

    sae.save_model(tmp_path / "mp")
    back = SAE.load_from_disk(tmp_path / "mp")
    assert back.cfg.architecture() == "matching_pursuit" and back.cfg.residual_threshold == 0.5
    x = inputs("matching_pursuit")
    acts, _, out = outputs(back, x)
    got_acts, _, got_out = jsae_outputs(jsae.SAE.load_from_disk(tmp_path / "mp"), x.numpy(), acts.numpy())
    assert rel_err(got_acts, acts.numpy()) <= 1e-5 and rel_err(got_out, out.numpy()) <= 1e-5


def test_tied_architectures_expose_their_encoder():
    from jsae.evals import featurewise_weight_metrics

    cfg = jsae.saes.get_architecture("matching_pursuit").config_cls(d_in=D_IN, d_sae=D_SAE)
    sae = random_sae(cfg, 4)
    np.testing.assert_array_equal(np.asarray(sae.W_enc), np.asarray(sae.W_dec).T)
    metrics = featurewise_weight_metrics(sae.params)
    np.testing.assert_allclose(metrics["encoder_decoder_cosine_sim"], 1.0, rtol=1e-6)


@pytest.mark.parametrize("case", ["matching_pursuit", "abstopk"])
def test_fold_activation_norm_scaling_factor_as_saelens(case, tmp_path):
    """Matching pursuit folds an input scale into b_dec and residual_threshold (its tied decoder keeps
    its directions), bit for bit as sae_lens does; other architectures fold into W_enc / W_dec / b_dec."""
    ref = saelens_sae(case, seed=8)
    ref.save_model(tmp_path / "ref")
    sae = jsae.SAE.load_from_disk(tmp_path / "ref").fold_activation_norm_scaling_factor(0.37)
    ref.fold_activation_norm_scaling_factor(0.37)
    for name, value in ref.state_dict().items():
        np.testing.assert_array_equal(np.asarray(sae.params[name]), to_numpy(value), err_msg=name)
    assert sae.cfg.normalize_activations == ref.cfg.normalize_activations == "none"
    if case == "matching_pursuit":
        assert sae.cfg.residual_threshold == ref.cfg.residual_threshold
    x = inputs(case)
    acts, _, out = outputs(ref, x)
    got_acts, _, got_out = jsae_outputs(sae, x.numpy(), acts.numpy())
    assert rel_err(got_acts, acts.numpy()) <= 1e-5 and rel_err(got_out, out.numpy()) <= 1e-5


def test_temporal_refuses_to_fold_an_input_scale():
    from jsae._errors import ConfigError

    cfg = jsae.saes.get_architecture("temporal").config_cls(d_in=D_IN, d_sae=D_SAE, n_heads=2, bottleneck_factor=4)
    with pytest.raises(ConfigError, match="constant_scalar_rescale"):
        random_sae(cfg, 0).fold_activation_norm_scaling_factor(2.0)
