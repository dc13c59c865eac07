"""Loss parity: every loss term and every gradient equals sae_lens' training_forward_pass + backward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from saelens_helpers import randomize_parameters, rel_err, to_numpy

from jsae.saes import TRAINING_ARCHITECTURES

D_IN, D_SAE, N = 16, 64, 48

CASES = {
    "standard": ("standard", {"l1_coefficient": 0.7}),
    "standard_l2": ("standard", {"l1_coefficient": 0.3, "lp_norm": 2.0}),
    "standard_no_bdec": ("standard", {"l1_coefficient": 0.5, "apply_b_dec_to_input": False}),
    "standard_layer_norm": ("standard", {"l1_coefficient": 0.5, "normalize_activations": "layer_norm"}),
    "gated": ("gated", {"l1_coefficient": 0.4}),
    "jumprelu_step": ("jumprelu", {"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.5}),
    "jumprelu_tanh_preact": ("jumprelu", {"l0_coefficient": 0.2, "jumprelu_sparsity_loss_mode": "tanh",
                                          "pre_act_loss_coefficient": 0.1, "jumprelu_bandwidth": 0.5}),
    "jumprelu_quadratic_ste_input": ("jumprelu", {"l0_coefficient": 0.05, "jumprelu_sparsity_loss_mode": "quadratic",
                                                  "target_l0": 10.0, "jumprelu_ste_to_input": True,
                                                  "jumprelu_bandwidth": 0.5}),
    "topk": ("topk", {"k": 5}),
    "topk_no_rescale": ("topk", {"k": 5, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 0.5}),
    "batchtopk": ("batchtopk", {"k": 4.5}),
    "matryoshka": ("matryoshka_batchtopk", {"k": 6.0, "matryoshka_widths": [8, 24, D_SAE]}),
    "matryoshka_level_aux": ("matryoshka_batchtopk", {"k": 6.0, "matryoshka_widths": [16, D_SAE],
                                                      "use_matryoshka_aux_loss": True}),
}


def make_pair(case, seed=0):
    from sae_lens.registry import get_sae_training_class

    arch, extra = CASES[case]
    sae_cls, cfg_cls = get_sae_training_class(arch)
    ref = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    randomize_parameters(ref, seed, threshold_scale=0.5, w_dec_floor=0.3)
    jarch = TRAINING_ARCHITECTURES[arch]
    fields = {f.name for f in dataclasses.fields(jarch.config_cls)} - {"metadata"}
    cfg = jarch.config_cls(**{k: v for k, v in ref.cfg.to_dict().items() if k in fields})
    params = {k: jnp.asarray(to_numpy(v)) for k, v in ref.named_parameters()}
    return ref, cfg, params, jarch


@pytest.mark.parametrize("case", list(CASES))
def test_loss_terms_and_gradients_match_saelens(case):
    from sae_lens.saes.sae import TrainStepInput

    ref, cfg, params, jarch = make_pair(case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=gen) * 1.5 + 0.2
    dead = torch.rand(D_SAE, generator=gen) < 0.4
    coefficients = {name: value * 0.8 for name, (value, _) in cfg.coefficients().items()}

    out = ref.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients=coefficients, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    want_grads = {k: p.grad for k, p in ref.named_parameters()}

    if jarch.project is not None:
        params = jarch.project(params, cfg)

    def loss_fn(p):
        result = jarch.forward(p, jnp.asarray(x.numpy()), cfg=cfg, coefficients=coefficients,
                               dead_mask=jnp.asarray(dead.numpy()))
        return result.loss, result

    (loss, result), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    assert set(result.losses) == set(out.losses), (sorted(result.losses), sorted(out.losses))
    for name, value in out.losses.items():
        assert rel_err(result.losses[name], value.detach().numpy()) <= 1e-4, name
    assert rel_err(loss, out.loss.detach().numpy()) <= 1e-4
    assert rel_err(result.feature_acts, out.feature_acts.detach().numpy()) <= 1e-4
    assert set(grads) == set(want_grads)
    for name, g in want_grads.items():
        if g is None or not torch.any(g != 0):
            assert float(jnp.abs(grads[name]).max()) <= 1e-6, name
            continue
        assert rel_err(grads[name], g.numpy()) <= 1e-4, f"gradient of {name}"
    if "auxiliary_reconstruction_loss" in out.losses and case.startswith(("topk", "batch", "matry")):
        assert float(out.losses["auxiliary_reconstruction_loss"]) > 0  # the dead-latent path was exercised


def test_aux_loss_is_zero_without_dead_latents():
    ref, cfg, params, jarch = make_pair("topk")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(N, D_IN)).astype(np.float32))
    result = jarch.forward(params, x, cfg=cfg, coefficients={}, dead_mask=jnp.zeros(D_SAE, bool))
    assert float(result.losses["auxiliary_reconstruction_loss"]) == 0.0


@pytest.mark.parametrize("case", ["jumprelu_step", "jumprelu_quadratic_ste_input", "jumprelu_tanh_preact"])
def test_fired_counts_count_the_nonzero_activations(case):
    """JumpReLU's fired counts come from its dense step's mask (the reference's or a back end's
    counts); they equal a count of the nonzero activations."""
    ref, cfg, params, jarch = make_pair(case)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(N, D_IN)).astype(np.float32) * 1.5)
    params = jarch.project(params, cfg)  # thresholds >= 0, as every step's forward sees them
    out = jarch.forward(params, x, cfg=cfg, coefficients={"l0": 0.3}, dead_mask=jnp.zeros(D_SAE, bool))
    assert out.fired_count is not None  # from the step mask, in every mode
    want = np.sum(np.asarray(out.feature_acts) != 0, axis=0)
    assert 0 < want.sum() < N * D_SAE
    np.testing.assert_array_equal(np.asarray(out.fired_counts()), want)
