"""Schedule parity: lr and coefficients at every step equal sae_lens' schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jsae
from jsae.training.schedules import coefficient_schedule, lr_schedule

CASES = [
    dict(scheduler="constant"),
    dict(scheduler="constant", warm_up_steps=10),
    dict(scheduler="constant", warm_up_steps=1),
    dict(scheduler="constant", decay_steps=20),
    dict(scheduler="constant", warm_up_steps=7, decay_steps=13),
    dict(scheduler="cosineannealing"),
    dict(scheduler="cosineannealing", warm_up_steps=10, lr_end=1e-5),
    dict(scheduler="cosineannealing", warm_up_steps=10, decay_steps=15, lr_end=2e-4),
    dict(scheduler="cosineannealingwarmrestarts", n_restart_cycles=3),
    dict(scheduler="cosineannealingwarmrestarts", n_restart_cycles=4, warm_up_steps=5, decay_steps=9),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_lr_matches_saelens_every_step(case):
    from sae_lens.training.optim import get_lr_scheduler

    total, lr = 100, 1e-3
    lr_end = case.get("lr_end", lr / 10)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = get_lr_scheduler(case["scheduler"], optimizer=opt, training_steps=total, lr=lr,
                           warm_up_steps=case.get("warm_up_steps", 0), decay_steps=case.get("decay_steps", 0),
                           lr_end=lr_end, num_cycles=case.get("n_restart_cycles", 1))
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    schedule = lr_schedule(lr=lr, total_steps=total, lr_end=lr_end, **{k: v for k, v in case.items() if k != "lr_end"})
    got = np.array([float(schedule(n)) for n in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("warm_up", [0, 1, 7])
def test_coefficient_warm_up_matches_saelens(warm_up):
    from sae_lens.training.optim import CoefficientScheduler

    ref = CoefficientScheduler(warm_up_steps=warm_up, final_value=2.5)
    schedule = coefficient_schedule(2.5, warm_up)
    for n in range(20):
        assert float(schedule(n)) == pytest.approx(ref.value, rel=1e-6)
        ref.step()


def test_bad_schedule_values_name_the_field():
    with pytest.raises(jsae.ConfigError, match=r"lr_scheduler_name.*'cosine'.*cosineannealing"):
        lr_schedule(lr=1e-3, total_steps=10, scheduler="cosine")
    with pytest.raises(jsae.ConfigError, match="lr must be > 0"):
        lr_schedule(lr=-1e-3, total_steps=10)
    with pytest.raises(jsae.ConfigError, match="lr_warm_up_steps"):
        lr_schedule(lr=1e-3, total_steps=10, warm_up_steps=-1)


def test_a_short_run_scales_the_warm_up_and_decay_into_its_steps():
    """A config made for a long run (lr_decay_steps: 100) run for fewer steps: both phases shrink in
    proportion, leaving main steps, with a warning naming the fields."""
    with pytest.warns(UserWarning, match=r"lr_warm_up_steps \(8\) \+ lr_decay_steps \(5\).*scaled to 5 and 4"):
        schedule = lr_schedule(lr=1e-3, total_steps=10, warm_up_steps=8, decay_steps=5)
    got = [float(schedule(n)) for n in range(10)]
    assert got[:5] == pytest.approx([1e-3 * (n + 1) / 5 for n in range(5)])  # warm-up over 5 steps
    assert got[5] == pytest.approx(1e-3) and got[9] < got[8] < got[7] < got[6]  # one main step, then the decay
    with pytest.warns(UserWarning, match="scaled to 0 and 47"):
        cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4), total_training_tokens=200_000,
                               train_batch_size_tokens=4096, lr_decay_steps=100)
    assert cfg.total_training_steps == 48
