"""Sweeps: N SAEs of one shape, each with its own hyperparameters, trained in one compiled step.

A sweep is a base `TrainConfig` plus axes, e.g. `{"sae.l1_coefficient": [1, 2, 4, 8], "seed": [0, 1, 2, 3]}`;
the axes are zipped (all the same length), giving one member config per position. The members'
states are stacked along a leading axis and the step runs every member on the same batch (vmapped,
mapped or unrolled: the execution plan's `sweep`), so one activation stream (and one model forward)
feeds all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae._errors import ConfigError
from jsae.backends import ExecutionPlan, resolve_plan
from jsae.training.config import SWEEP_STRATEGIES, TrainConfig
from jsae.training.step import Hyperparameters, TrainState, build_step, hyperparameters, init_train_state

Array = jax.Array

# Fields a sweep may vary: they change schedules, coefficients, the TopK k or the initialisation,
# never the shapes or the architecture, so every member runs the same compiled step.
SWEEPABLE_TRAIN_FIELDS = ("lr", "lr_end", "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps",
                          "n_restart_cycles", "seed")
SWEEPABLE_SAE_FIELDS = ("k", "l1_coefficient", "l1_warm_up_steps", "l0_coefficient", "l0_warm_up_steps")
K_ARCHITECTURES = ("topk", "topk_transcoder", "topk_skip_transcoder")


def sweep_configs(base: TrainConfig, axes: Mapping[str, Sequence[Any]], *, where: str = "sweep") -> list[TrainConfig]:
    """The member configs of a sweep: position i of every axis applied to `base`.

    Args:
        base: the shared config.
        axes: field -> values; "sae.<field>" for SAE fields (e.g. "sae.k"), the plain name for training fields.

    Raises:
        ConfigError naming the field: an unknown or unsweepable field, an empty axis, axes of different lengths.
    """
    if not axes:
        return [base]
    lengths = {}
    for field, values in axes.items():
        _check_field(base, field, where)
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"{where}.{field}: expected a non-empty list of values, got {values!r}.")
        lengths[field] = len(values)
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{field} has {n}" for field, n in lengths.items())
        raise ConfigError(f"{where}: the sweep axes are zipped, so they need the same length, but {listed} values.")
    members = []
    for i in range(next(iter(lengths.values()))):
        train_changes, sae_changes = {}, {}
        for field, values in axes.items():
            if field.startswith("sae."):
                sae_changes[field[4:]] = values[i]
            else:
                train_changes[field] = values[i]
        try:
            sae = base.sae.replace(**sae_changes) if sae_changes else base.sae
            members.append(base.replace(sae=sae, **train_changes))
        except ConfigError as err:
            raise ConfigError(f"{where}: member {i} ({member_name(axes, i)}): {err}") from err
    return members


def _check_field(base: TrainConfig, field: str, where: str) -> None:
    sae_names = base.sae.field_names()
    if field.startswith("sae."):
        name, names = field[4:], sae_names
    else:
        name, names = field, [f.name for f in dataclasses.fields(TrainConfig)]
    sweepable = [f"sae.{f}" for f in SWEEPABLE_SAE_FIELDS if f in sae_names
                 and (f != "k" or base.sae.architecture in K_ARCHITECTURES)] + list(SWEEPABLE_TRAIN_FIELDS)
    if name not in names:
        raise ConfigError(f"{where}: unknown field {field!r} for a {base.sae.architecture} SAE (SAE fields are "
                          f"written 'sae.<name>'); sweepable fields: {sweepable}.")
    if field not in sweepable:
        raise ConfigError(f"{where}: {field!r} cannot be swept in one compiled step (members must share shapes and "
                          f"architecture); sweepable fields of a {base.sae.architecture} SAE: {sweepable}.")


def member_name(axes: Mapping[str, Sequence[Any]], i: int) -> str:
    """A folder-friendly name of member i, e.g. "k=16_lr=0.001"."""
    return "_".join(f"{field.removeprefix('sae.')}={values[i]}" for field, values in axes.items()) or "sae"


def sweep_hyperparameters(members: Sequence[TrainConfig]) -> Hyperparameters:
    """Each member's hyperparameters (lr schedule, coefficient schedules and, where they differ, TopK's
    k), stacked along a leading member axis."""
    ks = [getattr(m.sae, "k", None) for m in members]
    vary_k = len(set(ks)) > 1
    each = [hyperparameters(m, {"k": np.int32(k)} if vary_k else None) for m, k in zip(members, ks, strict=True)]
    return jax.tree.map(lambda *xs: np.stack(xs), *each)


def check_members(members: Sequence[TrainConfig]) -> TrainConfig:
    """The config whose shapes the shared step is compiled for; members may differ only in sweepable fields."""
    if not members:
        raise ConfigError("sweep: no members.")
    base = members[0]
    k_max = max(getattr(m.sae, "k", 0) for m in members)

    def shared(cfg: TrainConfig) -> TrainConfig:
        sae = cfg.sae.replace(metadata=base.sae.metadata,
                              **{f: getattr(base.sae, f) for f in SWEEPABLE_SAE_FIELDS if hasattr(base.sae, f)})
        return cfg.replace(sae=sae, **{f: getattr(base, f) for f in SWEEPABLE_TRAIN_FIELDS})

    for i, member in enumerate(members[1:], start=1):
        if type(member.sae) is not type(base.sae) or shared(member) != shared(base):
            raise ConfigError(f"sweep: member {i} differs from member 0 in a field that cannot be swept "
                              f"(only {list(SWEEPABLE_TRAIN_FIELDS)} and sae.{list(SWEEPABLE_SAE_FIELDS)} may differ).")
    return base.replace(sae=base.sae.replace(k=k_max)) if k_max else base


def make_sweep_step(members: Sequence[TrainConfig], axis_name: str | None = None,
                    streams: Sequence[int] = (), strategy: str = "auto", *,
                    plan: ExecutionPlan | None = None) -> Callable:
    """step(states, batch) -> (states, metrics) for all members at once (states stacked on axis 0).

    Args:
        members: the member configs (see `sweep_configs`).
        axis_name: collective axis, as in `make_train_step`.
        streams: for several activation streams (hook points), the stream each member reads; the batch
            is then (n_streams, tokens, d_in). Empty: one (tokens, d_in) batch feeds every member.
        strategy: "vmap" batches the members' products together; "unroll" writes each member's step
            out in the one compiled step, so XLA can run independent members' work side by side
            (compile time grows with the members); "map" runs them one after another in a loop
            (`lax.map`); "auto": the plan's choice (`jsae.backends.resolve_strategy`).
        plan: what runs (default: `resolve_plan` of the members' shared config with `strategy`).

    Every metric gains a leading member axis. Works under shard_map / pmap like `make_train_step`.
    """
    if strategy not in SWEEP_STRATEGIES:
        raise ConfigError(f"sweep strategy must be one of {list(SWEEP_STRATEGIES)}, got {strategy!r}.")
    shape_cfg = check_members(members)
    if plan is None:
        plan = resolve_plan(shape_cfg.replace(sweep_strategy=strategy), n_members=len(members))
    strategy = plan.sweep or "vmap"
    hyper = sweep_hyperparameters(members)
    stream_of = np.asarray(streams, np.int32) if streams else None
    with_dead = build_step(shape_cfg, axis_name, plan=plan)
    if strategy == "unroll":

        def unrolled_step(states: TrainState, batch: Array):
            outs = []
            for i in range(len(members)):
                member_batch = batch if stream_of is None else batch[streams[i]]
                outs.append(with_dead(member_state(states, i), member_state(hyper, i), member_batch))
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        return unrolled_step
    if strategy == "map":

        def mapped_step(states: TrainState, batch: Array):
            if stream_of is None:
                return jax.lax.map(lambda a: with_dead(*a, batch), (states, hyper))
            return jax.lax.map(lambda a: with_dead(*a), (states, hyper, batch[stream_of]))

        return mapped_step
    # Under vmap a per-member "any latent dead?" branch would run both sides, so the sweep branches
    # once, outside the vmap, on whether any member has dead latents.
    none_dead = build_step(shape_cfg, axis_name, none_dead=True, plan=plan)

    def step(states: TrainState, batch: Array):
        if stream_of is None:
            args, in_axes = (states, hyper, batch), (0, 0, None)
        else:
            args, in_axes = (states, hyper, batch[stream_of]), (0, 0, 0)
        any_dead = jnp.any(states.steps_since_fired > shape_cfg.dead_feature_window)
        return jax.lax.cond(any_dead, lambda a: jax.vmap(with_dead, in_axes=in_axes)(*a),
                            lambda a: jax.vmap(none_dead, in_axes=in_axes)(*a), args)

    return step


def init_sweep_state(members: Sequence[TrainConfig], *, scaling_factor: float | Sequence[float] = 1.0) -> TrainState:
    """Each member's fresh state (its own seed), stacked along a leading axis.

    `scaling_factor` may be one value or one per member (expected_average_only_in per hook).
    """
    shape_cfg = check_members(members)
    factors = [scaling_factor] * len(members) if isinstance(scaling_factor, int | float) else list(scaling_factor)
    states = [init_train_state(shape_cfg.replace(seed=m.seed), scaling_factor=f) for m, f in zip(members, factors,
                                                                                                 strict=True)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Several SAEs trained together by `jsae.Trainer(cfg, sweep=...)`.

    Attributes:
        members: one config per SAE (same shapes; see `sweep_configs`).
        names: one folder name per SAE (saved to <output_path>/<name>); may contain "/".
        streams: the activation stream (hook point) each SAE reads, when batches are
            (n_streams, tokens, d_in); empty when every SAE reads the same (tokens, d_in) batch.
    """

    members: tuple[TrainConfig, ...]
    names: tuple[str, ...]
    streams: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "streams", tuple(self.streams))
        if len(self.names) != len(self.members) or len(set(self.names)) != len(self.names):
            raise ConfigError(f"Sweep.names: expected {len(self.members)} distinct names, got {list(self.names)}.")
        if self.streams and (len(self.streams) != len(self.members) or min(self.streams) < 0):
            raise ConfigError(f"Sweep.streams: expected one stream index >= 0 per member, got {list(self.streams)}.")
        check_members(self.members)

    @property
    def n_streams(self) -> int:
        return max(self.streams) + 1 if self.streams else 1


def member_state(states: Any, i: int) -> Any:
    """Member i's slice of stacked states (or hyperparameters)."""
    return jax.tree.map(lambda x: x[i], states)
