"""Training recovers a planted dictionary: synthetic activations built from known sparse features."""

from __future__ import annotations

import numpy as np
import pytest

import jsae

D_IN, N_TRUE, D_SAE, BATCH, STEPS = 32, 48, 64, 256, 2000


def planted(seed=0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(N_TRUE, D_IN))
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    active = rng.random((BATCH * STEPS, N_TRUE)) < 3 / N_TRUE  # ~3 features per token
    magnitudes = rng.uniform(0.5, 2.0, active.shape) * active
    return true, (magnitudes @ true).astype(np.float32)


def mean_max_cosine(true, W_dec):
    W = np.asarray(W_dec, np.float64)
    W = W / (np.linalg.norm(W, axis=1, keepdims=True) + 1e-12)
    return float((true @ W.T).max(axis=1).mean())


CONFIGS = {
    "standard": jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.3),
    "topk": jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
    "jumprelu": jsae.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.05,
                                               jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.1),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_learned_decoder_recovers_true_features(arch):
    true, data = planted()
    cfg = jsae.TrainConfig(sae=CONFIGS[arch], total_training_tokens=BATCH * STEPS, train_batch_size_tokens=BATCH,
                           lr=3e-3, lr_decay_steps=400, dead_feature_window=200, progress_bar=False, n_devices=1)
    sae = jsae.train(cfg, (data[i * BATCH:(i + 1) * BATCH] for i in range(STEPS)))
    score = mean_max_cosine(true, sae.params["W_dec"])
    assert score >= 0.9, f"{arch}: mean max cosine {score:.3f}"
    untrained = jsae.init_train_state(cfg).params["W_dec"]
    assert mean_max_cosine(true, untrained) < 0.7  # the bar is not met by chance
