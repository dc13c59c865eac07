"""The pure training step: `step(state, batch) -> (state, metrics)`, built by `make_train_step`.

The same function runs on one device, under a user's `jax.pmap(step, axis_name=...)` and under
jsae's own `jax.jit(jax.shard_map(...))` driver: with `axis_name` it averages gradients and
metrics over that axis. It never logs, saves or waits for the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jsae.backends import ExecutionPlan, resolve_plan
from jsae.backends.precision import matmul_precision_context
from jsae.saes import get_training_architecture
from jsae.saes._training import init_training_params
from jsae.training.config import TrainConfig
from jsae.training.optim import apply_update, make_optimizer
from jsae.training.schedules import CoefficientSchedule, LRSchedule, coefficient_at, lr_at

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed whole).

    Attributes:
        step: optimiser steps taken (int32 scalar).
        params: SAE parameters, SAELens tensor names.
        opt_state: optax state.
        rng: raw uint32 PRNG key data.
        steps_since_fired: per latent, steps since it last fired (SAELens' n_forward_passes_since_fired).
        act_freq: per latent, tokens it fired on in the current feature_sampling_window.
        window_tokens: tokens seen in the current window.
        extra: the architecture's own training state (`TrainingArchitecture.init_state`; {} for most).
        scaling_factor: input scale for expected_average_only_in (1.0 otherwise), for every architecture.
        skipped_batches: batches left out for holding NaN/inf.
    """

    step: Array
    params: dict
    opt_state: Any
    rng: Array
    steps_since_fired: Array
    act_freq: Array
    window_tokens: Array
    extra: Any
    scaling_factor: Array
    skipped_batches: Array


def init_train_state(cfg: TrainConfig, *, params: dict | None = None, scaling_factor: float = 1.0) -> TrainState:
    """A fresh state: SAELens' training init (or `params`), optimiser state and zeroed counters.

    Built by one compiled function per config (seed aside), not op by op, so that the init's many
    small operations compile once.
    """
    arch = get_training_architecture(cfg.sae.architecture)
    key = jax.random.key(cfg.seed)
    extra = arch.init_extra(cfg.sae) if params is None else None
    if params is not None:
        params = {k: jnp.asarray(v) for k, v in params.items()}
    return _state_initializer(cfg.replace(seed=0))(key, params, extra, jnp.asarray(scaling_factor, jnp.float32))


@functools.lru_cache(maxsize=32)
def _state_initializer(cfg: TrainConfig) -> Callable[..., TrainState]:
    """init_train_state's work for `cfg` (whose seed is unused: the key is an argument), jitted."""

    def fresh(key: Array, params: dict | None, extra: dict | None, scaling_factor: Array) -> TrainState:
        if params is None:
            params = init_training_params(cfg.sae, key, extra)
        d_sae = cfg.sae.d_sae
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=make_optimizer(cfg).init(params),
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            steps_since_fired=jnp.zeros((d_sae,), jnp.float32),
            act_freq=jnp.zeros((d_sae,), jnp.float32),
            window_tokens=jnp.zeros((), jnp.float32),
            extra=get_training_architecture(cfg.sae.architecture).init_state(cfg.sae),
            scaling_factor=scaling_factor,
            skipped_batches=jnp.zeros((), jnp.int32),
        )

    return jax.jit(fresh)


def _as_varying(tree, axis_name: str):
    """Mark every leaf as varying over `axis_name` (no-op for leaves that already vary, as under pmap)."""

    def cast(x):
        axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
        if axis_type is not None and axis_name in axis_type.varying:
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(cast, tree)


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


class Hyperparameters(NamedTuple):
    """What may differ between SAEs trained side by side, as arrays (optax's inject_hyperparams idea):
    a pytree that travels beside the state. A sweep stacks one per member along a leading axis and
    maps the same step over (states, hyperparameters); one SAE is the unstacked case.

    Attributes:
        lr: the learning-rate schedule (`jsae.training.schedules.LRSchedule`).
        coefficients: loss coefficient name -> its `CoefficientSchedule`.
        forward: extra keyword arguments of the architecture's forward (a TopK sweep's traced `k`), else {}.
    """

    lr: LRSchedule
    coefficients: dict[str, CoefficientSchedule]
    forward: dict[str, Array]


def hyperparameters(cfg: TrainConfig, forward: dict[str, Array] | None = None) -> Hyperparameters:
    """The hyperparameters of `cfg` as arrays."""
    coefficients = {name: CoefficientSchedule(np.float32(value), np.int32(warm_up))
                    for name, (value, warm_up) in cfg.sae.coefficients().items()}
    return Hyperparameters(cfg.lr_schedule_params(), coefficients, dict(forward or {}))


def make_train_step(cfg: TrainConfig, axis_name: str | None = None, *,
                    plan: ExecutionPlan | None = None) -> Callable[[TrainState, Array], tuple]:
    """Build the pure step for `cfg`.

    Args:
        cfg: the run config (static: closed over, never traced).
        axis_name: the collective axis to average gradients and metrics over (pmap / shard_map), or None.
        plan: what runs (`jsae.resolve_plan`); default: the plan for `cfg` on JAX's default backend.
            Compile with `compiler_options=plan.jit_compiler_options`.

    Returns:
        step(state, batch) -> (state, metrics); batch is (tokens, d_in) — this device's shard; a
        transcoder's is (tokens, d_in + d_out), input and target side by side. Where
        `plan.dead_latent_branch` it is a `lax.cond` on whether any latent is dead
        (`state.steps_since_fired`, the same on every device) between two programs.
    """
    plan = plan or resolve_plan(cfg)
    hyper = hyperparameters(cfg)
    step = build_step(cfg, axis_name, plan=plan)
    if not plan.dead_latent_branch:
        return lambda state, batch: step(state, hyper, batch)
    none_dead = build_step(cfg, axis_name, none_dead=True, plan=plan)

    def branched(state: TrainState, batch: Array) -> tuple[TrainState, dict[str, Array]]:
        any_dead = jnp.any(state.steps_since_fired > cfg.dead_feature_window)
        return jax.lax.cond(any_dead, step, none_dead, state, hyper, batch)

    return branched


def build_step(cfg: TrainConfig, axis_name: str | None = None, *, none_dead: bool = False,
               plan: ExecutionPlan | None = None) -> Callable:
    """step(state, hyperparameters, batch) -> (state, metrics) for `cfg`'s shapes and architecture: the
    learning rate, coefficients and forward arguments come from `hyperparameters` (`Hyperparameters`,
    data), the primitives and optimiser update from `plan`.

    none_dead: the caller knows no latent is dead; the forward then sees a constant all-false dead
    mask, so the dead-latent losses' `lax.cond` stays a branch under vmap instead of becoming a
    select that computes both sides.
    """
    plan = plan or resolve_plan(cfg)
    sae_cfg = cfg.sae
    arch = get_training_architecture(sae_cfg.architecture)
    tx = make_optimizer(cfg, plan)
    ops = plan.ops()
    scale_inputs = sae_cfg.normalize_activations == "expected_average_only_in"

    def reduce_mean(x):
        return jax.lax.pmean(x, axis_name) if axis_name is not None else x

    def reduce_sum(x):
        return jax.lax.psum(x, axis_name) if axis_name is not None else x

    def step(state: TrainState, hyper: Hyperparameters, batch: Array) -> tuple[TrainState, dict[str, Array]]:
        x = batch * state.scaling_factor.astype(batch.dtype) if scale_inputs else batch
        params = arch.project(state.params, sae_cfg) if arch.project is not None else state.params
        coefficients = {name: coefficient_at(state.step, c) for name, c in hyper.coefficients.items()}
        lr = lr_at(state.step, hyper.lr)
        forward_kwargs = hyper.forward
        if none_dead:
            dead_mask = np.zeros(state.steps_since_fired.shape, bool)
        else:
            dead_mask = state.steps_since_fired > cfg.dead_feature_window

        def loss_fn(p):
            out = arch.forward(p, x, cfg=sae_cfg, coefficients=coefficients, dead_mask=dead_mask, ops=ops,
                               **forward_kwargs)
            return out.loss, out

        # Differentiate each device's own loss w.r.t. a device-varying view of the parameters, then
        # average: under shard_map (parameters invariant over the axis) JAX would otherwise sum the
        # per-device gradients implicitly; under pmap they already vary, and this is a no-op.
        local_params = _as_varying(params, axis_name) if axis_name is not None else params
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
        grads = reduce_mean(grads)
        finite = jnp.all(jnp.isfinite(x)) & jnp.isfinite(loss) & _all_finite(grads)
        if axis_name is not None:
            finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
        local_fired = out.fired_counts()
        fired_counts = reduce_sum(local_fired)
        n_tokens = reduce_sum(jnp.asarray(x.shape[0], jnp.float32))

        def apply(state: TrainState) -> TrainState:
            new_params, opt_state = apply_update(tx, grads, state.opt_state, params, lr)
            reset = (state.step > 0) & (state.step % cfg.feature_sampling_window == 0)
            steps_since_fired = jnp.where(fired_counts > 0, 0.0, state.steps_since_fired + 1)
            return state.replace(
                step=state.step + 1,
                params=new_params,
                opt_state=opt_state,
                steps_since_fired=steps_since_fired,
                act_freq=jnp.where(reset, 0.0, state.act_freq) + fired_counts,
                window_tokens=jnp.where(reset, 0.0, state.window_tokens) + n_tokens,
                extra=arch.update_state(state.extra, out, sae_cfg, axis_name),
            )

        # A non-finite batch (or gradient) leaves the state untouched, step counter included. A
        # branch rather than a select of new and old values: the update then runs in place on the
        # donated state, without copies of the old moments kept for the select (under vmap, as in a
        # sweep, JAX turns it into that select).
        new_state = jax.lax.cond(finite, apply, lambda state: state, state)
        new_state = new_state.replace(skipped_batches=state.skipped_batches + (~finite))

        # Metrics, SAELens names. Explained variance (of the target: a transcoder's output hook) over the
        # global batch from summed moments.
        xf = sae_cfg.split_batch(x)[1].astype(jnp.float32)
        sq_err = reduce_sum(jnp.sum(jnp.square(out.sae_out.astype(jnp.float32) - xf)))
        sum_x = reduce_sum(jnp.sum(xf, axis=0))
        sum_sq = reduce_sum(jnp.sum(jnp.square(xf)))
        total_variance = sum_sq - jnp.sum(jnp.square(sum_x)) / n_tokens
        metrics = {f"losses/{name}": reduce_mean(value.astype(jnp.float32)) for name, value in out.losses.items()}
        metrics |= {
            "losses/overall_loss": reduce_mean(loss.astype(jnp.float32)),
            "metrics/l0": reduce_sum(jnp.sum(local_fired)) / n_tokens,
            "metrics/explained_variance": 1 - sq_err / total_variance,
            "sparsity/dead_features": jnp.sum(new_state.steps_since_fired > cfg.dead_feature_window),
            "sparsity/mean_passes_since_fired": jnp.mean(new_state.steps_since_fired),
            "details/current_learning_rate": lr,
            "details/skipped_batches": new_state.skipped_batches,
            "details/batch_finite": finite,
        }
        metrics |= {f"details/{name}_coefficient": value for name, value in coefficients.items()}
        metrics |= arch.state_metrics(new_state.extra, sae_cfg)
        return new_state, metrics

    if plan.matmul_precision == "default":
        return step

    def traced_with_precision(state: TrainState, hyper: Hyperparameters, batch: Array):
        # The float32 products take the plan's precision as they are traced (forward and backward).
        with matmul_precision_context(plan.matmul_precision):
            return step(state, hyper, batch)

    return traced_with_precision


def feature_density(state: TrainState) -> Array:
    """Fraction of tokens each latent fired on in the current window."""
    return state.act_freq / jnp.maximum(state.window_tokens, 1.0)


def log_feature_sparsity(state: TrainState) -> Array:
    """SAELens' sparsity.safetensors content: log10(density + 1e-10)."""
    return jnp.log10(feature_density(state) + 1e-10)


def estimate_scaling_factor(batches: list[Array], d_in: int, *, across_processes: bool = False) -> float:
    """expected_average_only_in: sqrt(d_in) / mean token norm over the given batches (inf where that
    mean is 0, NaN where the batches hold NaN). `across_processes`: the mean over every process's
    batches (a collective: every process of a multi-process run calls it), so all processes scale alike."""
    total, count = 0.0, 0
    for batch in batches:
        norms = jnp.linalg.norm(jnp.asarray(batch).astype(jnp.float32), axis=-1)
        total += float(jnp.sum(norms))
        count += norms.size
    if across_processes and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sums = np.asarray(multihost_utils.process_allgather(np.array([total, count], np.float64)))
        total, count = float(sums[:, 0].sum()), int(sums[:, 1].sum())
    mean = total / count
    return math.sqrt(d_in) / mean if mean > 0 else math.inf  # zeros alone cannot be scaled
