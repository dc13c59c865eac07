"""Learning-rate and coefficient schedules, as optax schedules with SAELens' exact values.

SAELens chains torch schedulers: linear warm-up (lr * (n+1) / warm_up_steps), then constant /
cosine annealing to lr_end / cosine with warm restarts, then a linear decay from lr_end (lr for
constant) to 0 over the last lr_decay_steps. The optax schedule below gives the same lr at
every step (checked against sae_lens.training.optim.get_lr_scheduler in the tests).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jsae._errors import ConfigError, close_names

SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")


def lr_schedule(
    *,
    lr: float,
    total_steps: int,
    scheduler: str = "constant",
    warm_up_steps: int = 0,
    decay_steps: int = 0,
    lr_end: float | None = None,
    n_restart_cycles: int = 1,
) -> optax.Schedule:
    """The learning rate at optimiser step n (0-based)."""
    name = scheduler.lower()
    if name not in SCHEDULERS:
        raise ConfigError(
            f"lr_scheduler_name must be one of {list(SCHEDULERS)}, got {scheduler!r}." + close_names(name, SCHEDULERS)
        )
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}.")
    lr_end = lr / 10 if lr_end is None else lr_end
    main_steps = total_steps - warm_up_steps - decay_steps
    if warm_up_steps < 0 or decay_steps < 0 or main_steps <= 0:
        raise ConfigError(
            f"lr_warm_up_steps ({warm_up_steps}) + lr_decay_steps ({decay_steps}) must be >= 0 and leave steps "
            f"for the main schedule within the {total_steps} training steps."
        )
    if n_restart_cycles < 1 or (name == "cosineannealingwarmrestarts" and main_steps // n_restart_cycles < 1):
        raise ConfigError(f"n_restart_cycles must be in [1, {main_steps}], got {n_restart_cycles!r}.")

    if name == "constant":
        main = optax.constant_schedule(lr)
        decay_start = lr
    elif name == "cosineannealing":
        main = _cosine(lr, lr_end, main_steps)
        decay_start = lr_end
    else:
        period = main_steps // n_restart_cycles
        cosine = _cosine(lr, lr_end, period)
        main = lambda count: cosine(jnp.mod(count, period))  # noqa: E731
        decay_start = lr_end

    schedules, boundaries = [], []
    if warm_up_steps > 0:
        schedules.append(lambda count: lr * (count + 1) / warm_up_steps)
        boundaries.append(warm_up_steps)
    schedules.append(main)
    if decay_steps > 0:
        if decay_start == 0:
            raise ConfigError("lr_decay_steps > 0 with lr_end = 0 would decay from 0 to 0; set lr_end > 0.")
        schedules.append(optax.linear_schedule(decay_start, 0.0, decay_steps))
        boundaries.append(total_steps - decay_steps)
    return optax.join_schedules(schedules, boundaries) if boundaries else schedules[0]


def _cosine(lr: float, lr_end: float, period: int) -> optax.Schedule:
    """torch's CosineAnnealingLR: lr_end + (lr - lr_end) (1 + cos(pi t / period)) / 2."""

    def schedule(count):
        return lr_end + (lr - lr_end) * (1 + jnp.cos(jnp.pi * count / period)) / 2

    return schedule


def coefficient_schedule(value: float, warm_up_steps: int) -> optax.Schedule:
    """SAELens' coefficient warm-up: value * min(n / warm_up_steps, 1) at step n."""
    if warm_up_steps <= 0:
        return optax.constant_schedule(value)
    return optax.linear_schedule(0.0, value, warm_up_steps)
