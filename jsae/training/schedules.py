"""Learning-rate and coefficient schedules with SAELens' exact values, as functions of data.

SAELens chains torch schedulers (sae_lens/training/optim.py): linear warm-up
(lr * (n+1) / warm_up_steps), then constant / cosine annealing to lr_end / cosine with warm
restarts, then a linear decay from lr_end (lr for constant) to 0 over the last lr_decay_steps.
The schedule's parameters are arrays (`LRSchedule`), so SAEs trained side by side in a sweep each
follow their own schedule through one compiled step; `lr_at(step, schedule)` gives the same lr at
every step as sae_lens (checked against sae_lens.training.optim.get_lr_scheduler in the tests).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jsae._errors import ConfigError, close_names

SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")


class LRSchedule(NamedTuple):
    """A learning-rate schedule as data (a pytree of scalars; stacked along a leading axis in a sweep).

    Attributes:
        lr, lr_end: the peak and the cosine's floor (float32).
        warm_up, decay: the first and last phases' steps; main: the steps between (int32).
        scheduler: the index of the main phase in SCHEDULERS; period: a warm restart's length (int32).
    """

    lr: jax.Array
    lr_end: jax.Array
    warm_up: jax.Array
    main: jax.Array
    decay: jax.Array
    scheduler: jax.Array
    period: jax.Array


def fit_phases(total_steps: int, warm_up_steps: int, decay_steps: int) -> tuple[int, int]:
    """(warm-up, decay) steps that leave at least one main step: as given where they fit, else both
    scaled down in proportion (a short run of a config made for a long one), with a warning."""
    if warm_up_steps + decay_steps < total_steps or total_steps < 2:
        return warm_up_steps, decay_steps
    room = total_steps - 1
    warm = warm_up_steps * room // (warm_up_steps + decay_steps)
    decay = room - warm if decay_steps else 0
    warnings.warn(f"lr_warm_up_steps ({warm_up_steps}) + lr_decay_steps ({decay_steps}) leave no steps of the main "
                  f"schedule within the {total_steps} training steps: scaled to {warm} and {decay}.",
                  UserWarning, stacklevel=3)
    return warm, decay


def lr_schedule_params(*, lr: float, total_steps: int, scheduler: str = "constant", warm_up_steps: int = 0,
                       decay_steps: int = 0, lr_end: float | None = None, n_restart_cycles: int = 1) -> LRSchedule:
    """The schedule's parameters, validated (errors name the TrainConfig field)."""
    name = scheduler.lower()
    if name not in SCHEDULERS:
        raise ConfigError(
            f"lr_scheduler_name must be one of {list(SCHEDULERS)}, got {scheduler!r}." + close_names(name, SCHEDULERS)
        )
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}.")
    if warm_up_steps < 0 or decay_steps < 0:
        raise ConfigError(f"lr_warm_up_steps ({warm_up_steps}) and lr_decay_steps ({decay_steps}) must be >= 0.")
    warm_up_steps, decay_steps = fit_phases(total_steps, warm_up_steps, decay_steps)
    lr_end = lr / 10 if lr_end is None else lr_end
    main_steps = total_steps - warm_up_steps - decay_steps
    if main_steps <= 0:
        raise ConfigError(f"lr_warm_up_steps ({warm_up_steps}) + lr_decay_steps ({decay_steps}) must leave steps for "
                          f"the main schedule within the {total_steps} training steps.")
    if n_restart_cycles < 1 or (name == "cosineannealingwarmrestarts" and main_steps // n_restart_cycles < 1):
        raise ConfigError(f"n_restart_cycles must be in [1, {main_steps}], got {n_restart_cycles!r}.")
    if decay_steps > 0 and (lr if name == "constant" else lr_end) == 0:
        raise ConfigError("lr_decay_steps > 0 with lr_end = 0 would decay from 0 to 0; set lr_end > 0.")
    f32, i32 = np.float32, np.int32  # numpy scalars: building a config never starts JAX's backend
    return LRSchedule(f32(lr), f32(lr_end), i32(warm_up_steps), i32(main_steps), i32(decay_steps),
                      i32(SCHEDULERS.index(name)), i32(max(main_steps // n_restart_cycles, 1)))


def lr_at(step: jax.Array, s: LRSchedule) -> jax.Array:
    """The learning rate at optimiser step `step` (0-based) of schedule `s`."""
    step = jnp.asarray(step)
    warm_up = s.lr * (step + 1) / jnp.maximum(s.warm_up, 1)
    t = step - s.warm_up  # the main phase's own count
    cosine = s.lr_end + (s.lr - s.lr_end) * (1 + jnp.cos(jnp.pi * t / s.main)) / 2
    restarts = s.lr_end + (s.lr - s.lr_end) * (1 + jnp.cos(jnp.pi * jnp.mod(t, s.period) / s.period)) / 2
    main = jnp.select([s.scheduler == 0, s.scheduler == 1], [s.lr, cosine], restarts)
    decay_from = jnp.where(s.scheduler == 0, s.lr, s.lr_end)
    into_decay = jnp.clip(step - (s.warm_up + s.main), 0, s.decay)
    decay = decay_from * (1 - into_decay / jnp.maximum(s.decay, 1))
    out = jnp.where(step < s.warm_up, warm_up, main)
    return jnp.where((s.decay > 0) & (step >= s.warm_up + s.main), decay, out).astype(jnp.float32)


def lr_schedule(**kwargs):
    """step -> lr of the schedule `lr_schedule_params(**kwargs)` describes."""
    params = lr_schedule_params(**kwargs)
    return lambda step: lr_at(step, params)


class CoefficientSchedule(NamedTuple):
    """A loss coefficient as data: its final value and its linear warm-up's steps (0: none)."""

    value: jax.Array
    warm_up: jax.Array


def coefficient_at(step: jax.Array, s: CoefficientSchedule) -> jax.Array:
    """SAELens' coefficient warm-up: value * min(n / warm_up_steps, 1) at step n."""
    frac = 1 - jnp.clip(step, 0, s.warm_up) / jnp.maximum(s.warm_up, 1)
    return jnp.where(s.warm_up > 0, -s.value * frac + s.value, s.value).astype(jnp.float32)


def coefficient_schedule(value: float, warm_up_steps: int):
    """step -> the coefficient (`coefficient_at` of fixed parameters)."""
    params = CoefficientSchedule(np.float32(value), np.int32(max(warm_up_steps, 0)))
    return lambda step: coefficient_at(step, params)
