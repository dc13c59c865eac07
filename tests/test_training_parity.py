"""Training parity: 200 steps from the same init on the same batches, jsae and sae_lens agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from saelens_helpers import to_numpy

import jsae
from jsae.saes import TRAINING_ARCHITECTURES

D_IN, D_SAE, BATCH, STEPS = 24, 96, 128, 200

CASES = {
    "standard": ("standard", {"l1_coefficient": 2.0, "l1_warm_up_steps": 20}),
    "topk": ("topk", {"k": 6}),
    "jumprelu": ("jumprelu", {"l0_coefficient": 0.5, "jumprelu_bandwidth": 0.1, "jumprelu_init_threshold": 0.05}),
}
TRAINER = dict(lr=3e-3, lr_scheduler_name="cosineannealing", lr_warm_up_steps=10, lr_decay_steps=20,
               dead_feature_window=40, feature_sampling_window=100)


def batches(seed=0):
    """Activation-like data: a few strong directions plus noise, non-zero mean."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(40, D_IN)).astype(np.float32)
    out = []
    for _ in range(STEPS):
        codes = rng.exponential(size=(BATCH, 40)) * (rng.random((BATCH, 40)) < 0.1)
        out.append((codes @ directions + 0.3 * rng.normal(size=(BATCH, D_IN)) + 0.5).astype(np.float32))
    return out


def run_saelens(arch, extra, data):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae_cls, cfg_cls = get_sae_training_class(arch)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    init = {k: to_numpy(v).copy() for k, v in sae.state_dict().items()}
    cfg = SAETrainerConfig(total_training_samples=STEPS * BATCH, train_batch_size_samples=BATCH,
                           lr_end=TRAINER["lr"] / 10, **TRAINER)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter([torch.from_numpy(b) for b in data]))
    losses = []
    original = trainer._train_step

    def recording_step(sae, sae_in):
        out = original(sae=sae, sae_in=sae_in)
        losses.append(float(out.loss))
        return out

    trainer._train_step = recording_step
    trainer.fit()
    final = {k: to_numpy(v) for k, v in trainer.sae.state_dict().items()}
    return init, final, np.array(losses), trainer


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_200_steps_match_saelens(case, tmp_path):
    arch, extra = CASES[case]
    data = batches()
    init, want, want_losses, ref_trainer = run_saelens(arch, extra, data)

    sae_cfg = TRAINING_ARCHITECTURES[arch].config_cls(d_in=D_IN, d_sae=D_SAE, **extra)
    cfg = jsae.TrainConfig(sae=sae_cfg, total_training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH,
                           log_every_n_steps=1, log_path=str(tmp_path / "m.jsonl"), progress_bar=False, n_devices=1,
                           **TRAINER)
    trainer = jsae.Trainer(cfg)
    sae = trainer.fit(iter(data), params=init)
    got = {k: np.asarray(v) for k, v in trainer.state.params.items()}
    for name, ref in want.items():
        ref = np.asarray(ref, np.float64)
        rel = np.linalg.norm(np.asarray(got[name], np.float64) - ref) / np.linalg.norm(ref)
        assert rel <= 1e-3, f"{name}: relative difference {rel:.2e} after {STEPS} steps"
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    got_losses = np.array([r["losses/overall_loss"] for r in rows if "losses/overall_loss" in r])
    assert len(got_losses) == STEPS
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-2)
    assert want_losses[-1] < 0.5 * want_losses[0]  # it actually trained
    # the saved metadata agree too
    assert sae.cfg.metadata.num_dead_features == int(ref_trainer.dead_neurons.sum())
    assert sae.cfg.metadata.l0 == pytest.approx(float(ref_trainer.feature_sparsity.sum()), rel=1e-4)
