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
import optax

from jsae import kernels
from jsae.saes import get_training_architecture
from jsae.saes._training import init_training_params
from jsae.saes.batchtopk import init_threshold, threshold_value, update_threshold
from jsae.training.config import TrainConfig
from jsae.training.schedules import coefficient_schedule

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
        batch_threshold: BatchTopK running threshold as a float32 (hi, lo) pair (zeros otherwise).
        scaling_factor: input scale for expected_average_only_in (1.0 otherwise).
        skipped_batches: batches left out for holding NaN/inf.
    """

    step: Array
    params: dict
    opt_state: Any
    rng: Array
    steps_since_fired: Array
    act_freq: Array
    window_tokens: Array
    batch_threshold: Array
    scaling_factor: Array
    skipped_batches: Array


ADAM_EPS = 1e-8  # torch.optim.Adam's default


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clip, then Adam's direction (torch Adam: eps 1e-8 outside the sqrt).

    The learning rate is applied by the step (`-lr(step) * direction`), so that SAEs trained side
    by side in a sweep can each follow their own schedule.
    """
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.scale_by_adam(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=ADAM_EPS),
    )


def init_train_state(cfg: TrainConfig, *, params: dict | None = None, scaling_factor: float = 1.0) -> TrainState:
    """A fresh state: SAELens' training init (or `params`), optimiser state and zeroed counters.

    Built by one compiled function per config (seed aside), not op by op: eagerly, each of the
    init's ~40 small operations compiled on its own (~0.8 s on 2 CPU cores, before training starts).
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
            batch_threshold=init_threshold(),
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
    """What may differ between the SAEs of a sweep, as functions of the step (and the member index).

    lr(step, member) and coefficients(step, member) -> {name: value}; forward_kwargs(member) -> extra
    keyword arguments of the architecture's forward (e.g. a traced `k`).
    """

    lr: Callable[[Array, Any], Array]
    coefficients: Callable[[Array, Any], dict[str, Array]]
    forward_kwargs: Callable[[Any], dict[str, Any]]


# XLA options the training steps compile with, per platform. On CPU, XLA's YNNPACK fusions run
# the step's (tokens, d_in) x (d_in, d_sae) encoder product ~10% slower than its default dot on
# 2 cores (768 -> 6144: 229 vs 210 ms), ~5% of a dense step (bench/RESULTS.md).
STEP_COMPILER_OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}


@functools.cache
def step_compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a training step on `platform` (default: JAX's default backend).

    None where jsae sets nothing, or where this jaxlib does not know an option.
    """
    platform = platform or jax.default_backend()
    options = STEP_COMPILER_OPTIONS.get(platform)
    if not options:
        return None
    probe = jax.device_put(np.zeros((2, 2), np.float32), jax.devices(platform)[0])
    try:
        jax.jit(lambda a: a @ a, compiler_options=options).lower(probe).compile()
    except Exception:  # an option this jaxlib does not know: compile with its defaults
        return None
    return dict(options)


def uses_fused_adam(cfg: TrainConfig, params: dict) -> bool:
    """Whether the step updates `params` with jsae.kernels.adam (cfg.adam_implementation "auto",
    JAX's default backend the CPU, every parameter float32, the CPU kernels available)."""
    return (cfg.adam_implementation == "auto" and jax.default_backend() == "cpu"
            and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)) and kernels.available())


def _fused_adam(cfg: TrainConfig, grads: dict, opt_state: Any, params: dict, lr: Array) -> tuple[dict, Any]:
    """make_optimizer's chain and apply_updates in one pass over each parameter (jsae.kernels.adam):
    the same clip, moments, bias corrections and update, computed as optax does; the global norm's
    squares summed by dot products (one read of each gradient; sums in another order)."""
    clip_state, adam_state = opt_state
    norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
    keep = norm < cfg.max_grad_norm
    count = optax.safe_increment(adam_state.count)
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    f32 = jnp.float32
    coefficients = jnp.stack([
        keep.astype(f32), norm.astype(f32), f32(cfg.max_grad_norm), f32(1 - b1), f32(b1), f32(1 - b2), f32(b2),
        (1 - b1**count).astype(f32), (1 - b2**count).astype(f32), f32(ADAM_EPS), -jnp.asarray(lr, f32)])
    new_params, mu, nu = {}, {}, {}
    for name in params:
        new_params[name], mu[name], nu[name] = kernels.adam(params[name], grads[name], adam_state.mu[name],
                                                            adam_state.nu[name], coefficients)
    return new_params, (clip_state, adam_state._replace(count=count, mu=mu, nu=nu))


def hyperparameters(cfg: TrainConfig) -> Hyperparameters:
    """The hyperparameters of one SAE (the member index is ignored)."""
    lr_fn = cfg.lr_schedule()
    coefficient_fns = {name: coefficient_schedule(v, w) for name, (v, w) in cfg.sae.coefficients().items()}
    return Hyperparameters(
        lr=lambda step, member: lr_fn(step),
        coefficients=lambda step, member: {name: fn(step) for name, fn in coefficient_fns.items()},
        forward_kwargs=lambda member: {},
    )


def make_train_step(cfg: TrainConfig, axis_name: str | None = None) -> Callable[[TrainState, Array], tuple]:
    """Build the pure step for `cfg`.

    Args:
        cfg: the run config (static: closed over, never traced).
        axis_name: the collective axis to average gradients and metrics over (pmap / shard_map), or None.

    Returns:
        step(state, batch) -> (state, metrics); batch is (tokens, d_in) — this device's shard. Where
        `branches_on_dead_latents(cfg)` it is a `lax.cond` on whether any latent is dead
        (`state.steps_since_fired`, the same on every device) between two programs.
    """
    hyper = hyperparameters(cfg)
    step = build_step(cfg, hyper, axis_name)
    if not branches_on_dead_latents(cfg):
        return lambda state, batch: step(state, batch, None)
    none_dead = build_step(cfg, hyper, axis_name, none_dead=True)

    def branched(state: TrainState, batch: Array) -> tuple[TrainState, dict[str, Array]]:
        any_dead = jnp.any(state.steps_since_fired > cfg.dead_feature_window)
        return jax.lax.cond(any_dead, lambda s, b: step(s, b, None), lambda s, b: none_dead(s, b, None), state, batch)

    return branched


# From this many weights per matrix (d_in * d_sae) the step branches on dead latents. In the
# none-dead program the dead mask is a constant and XLA drops the aux-k loss's branches, which
# otherwise fill zero residuals and zero W_enc / W_dec gradients every step while nothing is dead:
# on 2 cores, TopK 768 -> 16384 ~57 ms of a ~1 s step (the step's median 1.22 -> 0.93 s). Two
# programs compile ~0.5-0.7 s longer (up to ~2 s beside the first buffer fill), which narrower
# SAEs do not win back (128 -> 1024: ~1-4 ms of a ~30 ms step).
DEAD_BRANCH_MIN_WEIGHTS = 1 << 21


def branches_on_dead_latents(cfg: TrainConfig) -> bool:
    """Whether `make_train_step(cfg)` is a `lax.cond` on any latent being dead: an architecture with an
    aux-k loss (`TrainingArchitecture.dead_latent_loss`) and at least DEAD_BRANCH_MIN_WEIGHTS weights per matrix."""
    return (get_training_architecture(cfg.sae.architecture).dead_latent_loss
            and cfg.sae.d_in * cfg.sae.d_sae >= DEAD_BRANCH_MIN_WEIGHTS)


def build_step(cfg: TrainConfig, hyper: Hyperparameters, axis_name: str | None = None, *,
               none_dead: bool = False) -> Callable:
    """step(state, batch, member) -> (state, metrics) for `cfg`'s shapes and architecture, taking the
    learning rate, coefficients and forward arguments from `hyper` (see `jsae.training.sweep`).

    none_dead: the caller knows no latent is dead; the forward then sees a constant all-false dead
    mask, so the dead-latent losses' `lax.cond` stays a branch under vmap instead of becoming a
    select that computes both sides.
    """
    sae_cfg = cfg.sae
    arch = get_training_architecture(sae_cfg.architecture)
    tx = make_optimizer(cfg)
    scale_inputs = sae_cfg.normalize_activations == "expected_average_only_in"

    def reduce_mean(x):
        return jax.lax.pmean(x, axis_name) if axis_name is not None else x

    def reduce_sum(x):
        return jax.lax.psum(x, axis_name) if axis_name is not None else x

    def step(state: TrainState, batch: Array, member: Any) -> tuple[TrainState, dict[str, Array]]:
        x = batch * state.scaling_factor.astype(batch.dtype) if scale_inputs else batch
        params = arch.project(state.params, sae_cfg) if arch.project is not None else state.params
        coefficients = hyper.coefficients(state.step, member)
        lr = hyper.lr(state.step, member)
        forward_kwargs = hyper.forward_kwargs(member)
        if none_dead:
            dead_mask = np.zeros(state.steps_since_fired.shape, bool)
        else:
            dead_mask = state.steps_since_fired > cfg.dead_feature_window

        def loss_fn(p):
            out = arch.forward(p, x, cfg=sae_cfg, coefficients=coefficients, dead_mask=dead_mask, **forward_kwargs)
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
        fused_adam = uses_fused_adam(cfg, params)

        def apply(state: TrainState) -> TrainState:
            if fused_adam:
                new_params, opt_state = _fused_adam(cfg, grads, state.opt_state, params, lr)
            else:
                directions, opt_state = tx.update(grads, state.opt_state, params)
                updates = jax.tree.map(lambda d: (-lr * d).astype(d.dtype), directions)
                new_params = optax.apply_updates(params, updates)
            reset = (state.step > 0) & (state.step % cfg.feature_sampling_window == 0)
            steps_since_fired = jnp.where(fired_counts > 0, 0.0, state.steps_since_fired + 1)
            batch_threshold = state.batch_threshold
            if arch.batch_threshold:
                batch_threshold = update_threshold(batch_threshold, out.feature_acts, sae_cfg.topk_threshold_lr,
                                                   axis_name)
            return state.replace(
                step=state.step + 1,
                params=new_params,
                opt_state=opt_state,
                steps_since_fired=steps_since_fired,
                act_freq=jnp.where(reset, 0.0, state.act_freq) + fired_counts,
                window_tokens=jnp.where(reset, 0.0, state.window_tokens) + n_tokens,
                batch_threshold=batch_threshold,
            )

        # A non-finite batch (or gradient) leaves the state untouched, step counter included. A
        # branch rather than a select of new and old values: the update then runs in place on the
        # donated state, without copies of the old moments kept for the select (under vmap, as in a
        # sweep, JAX turns it into that select).
        new_state = jax.lax.cond(finite, apply, lambda state: state, state)
        new_state = new_state.replace(skipped_batches=state.skipped_batches + (~finite))

        # Metrics, SAELens names. Explained variance over the global batch from summed moments.
        xf = x.astype(jnp.float32)
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
        if arch.batch_threshold:
            metrics["metrics/topk_threshold"] = threshold_value(new_state.batch_threshold)
        return new_state, metrics

    return step


def feature_density(state: TrainState) -> Array:
    """Fraction of tokens each latent fired on in the current window."""
    return state.act_freq / jnp.maximum(state.window_tokens, 1.0)


def log_feature_sparsity(state: TrainState) -> Array:
    """SAELens' sparsity.safetensors content: log10(density + 1e-10)."""
    return jnp.log10(feature_density(state) + 1e-10)


def estimate_scaling_factor(batches: list[Array], d_in: int) -> float:
    """expected_average_only_in: sqrt(d_in) / mean token norm over the given batches."""
    total, count = 0.0, 0
    for batch in batches:
        norms = jnp.linalg.norm(jnp.asarray(batch).astype(jnp.float32), axis=-1)
        total += float(jnp.sum(norms))
        count += norms.size
    return math.sqrt(d_in) / (total / count)
