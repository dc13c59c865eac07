"""The optimiser: SAELens' clipped Adam as an optax transformation, with a back end's fused update.

SAELens trains with torch Adam after a global-norm clip (sae_lens/training/sae_trainer.py); the
learning rate is applied by the step (`params - lr(step) · direction`), so that SAEs trained side
by side in a sweep can each follow their own schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from jsae.backends import ExecutionPlan, fused_optimizer_apply

ADAM_EPS = 1e-8  # torch.optim.Adam's default


class Optimizer(NamedTuple):
    """An optax GradientTransformation (`init`, `update`: the clipped Adam direction) with an optional
    `apply(grads, state, params, lr) -> (params, state)` that a back end fuses into one in-place pass;
    both give the same parameters and state (up to float rounding)."""

    init: Callable
    update: Callable
    apply: Callable | None = None


def adam_chain(cfg) -> optax.GradientTransformation:
    """Global-norm clip, then Adam's direction (torch Adam: eps 1e-8 outside the sqrt)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.scale_by_adam(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=ADAM_EPS),
    )


def make_optimizer(cfg, plan: ExecutionPlan | None = None) -> Optimizer:
    """The run's optimiser; with `plan`, its update is the back end's where the plan chose one."""
    chain = adam_chain(cfg)
    fused = None if plan is None else fused_optimizer_apply(
        plan, max_grad_norm=cfg.max_grad_norm, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=ADAM_EPS)
    return Optimizer(chain.init, chain.update, fused)


def apply_update(tx: Optimizer, grads: Any, opt_state: Any, params: Any, lr: jax.Array) -> tuple[Any, Any]:
    """(params - lr · direction, new optimiser state)."""
    if tx.apply is not None:
        return tx.apply(grads, opt_state, params, lr)
    directions, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda d: (-lr * d).astype(d.dtype), directions)
    return optax.apply_updates(params, updates), opt_state
