"""Where a run's arrays live: the device mesh, the state's shardings, and the compiled step on them.

Data parallel: a 1-D `data` mesh, the state replicated, the step under `jax.shard_map` with its
gradients averaged over `data`. Feature sharding (`model_axis_size > 1`): a (data, model) mesh,
the latents split over `model`, the plain step under `jax.jit` with those shardings (XLA
partitions it). jit, donation, shardings and compiler options are chosen here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsae._errors import ConfigError
from jsae.backends.sharded import DATA_AXIS, MODEL_AXIS, latent_mesh
from jsae.saes import TrainingArchitecture

# Per-latent TrainState counters (one entry per latent), split over the model axis with the latents.
LATENT_COUNTERS = ("steps_since_fired", "act_freq")


def state_sharding(state: Any, mesh: Mesh, arch: TrainingArchitecture) -> Any:
    """NamedShardings for `state` (a TrainState or its abstract shapes) that split the latents over the
    mesh's model axis: the architecture's per-latent parameters (`arch.latent_axes`; their Adam
    moments carry the same names) and the per-latent counters. Derived from the leaves' names,
    never their shapes (d_in may equal d_sae); everything else is replicated."""
    axes = dict(arch.latent_axes) | dict.fromkeys(LATENT_COUNTERS, -1)

    def sharding(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        axis = axes.get(name) if isinstance(name, str) else None
        ndim = len(getattr(leaf, "shape", ()))
        if axis is None or ndim < -axis:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*(MODEL_AXIS if i == ndim + axis else None for i in range(ndim))))

    return jax.tree_util.tree_map_with_path(sharding, state)


def make_mesh(devices: list, model_axis_size: int, batch_size: int) -> Mesh:
    """The run's mesh over `devices`: (data,) or (data, model); checks the sizes divide."""
    n, model = len(devices), model_axis_size
    if n % model:
        raise ConfigError(
            f"TrainConfig.model_axis_size={model} does not divide the {n} device(s) of the mesh"
            + (" (larger than the devices available)" if model > n else "")
            + f"; choose a divisor of {n}, or set n_devices."
        )
    n_data = n // model
    if batch_size % n_data:
        data_axis = (f"{n} devices of the mesh" if model == 1 else
                     f"data axis size {n_data} ({n} devices / model_axis_size={model})")
        raise ConfigError(
            f"TrainConfig.train_batch_size_tokens={batch_size} is not divisible by the {data_axis}; choose a "
            f"multiple of {n_data}."
        )
    if model == 1:
        return Mesh(np.array(devices), (DATA_AXIS,))
    grid = np.array(devices).reshape(n_data, model)
    if any(len({d.process_index for d in row}) > 1 for row in grid):
        raise ConfigError(
            f"TrainConfig.model_axis_size={model} would split latents over devices of different processes; "
            f"choose a divisor of each process's device count ({jax.local_device_count()})."
        )
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def check_fits(state_shape: Any, cfg, devices: list, n_members: int = 1) -> None:
    """Refuse, before anything is allocated, a run whose state and smallest step temporaries cannot fit
    one device: the parameters and Adam moments (split over the model axis where sharded) plus two
    (tokens, d_sae) float32 arrays per SAE, a lower bound of what any step's forward and backward hold."""
    from jsae.backends import device_memory_bytes

    limit = device_memory_bytes(devices[0])
    if limit is None:
        return
    state = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state_shape))
    model = cfg.model_axis_size
    tokens = cfg.train_batch_size_tokens // (len(devices) // model)
    temporaries = 2 * tokens * (cfg.sae.d_sae // model) * 4 * n_members
    need = state // model + temporaries
    if need > limit:
        gib = 1 << 30
        raise ConfigError(
            f"the run needs at least {need / gib:.1f} GiB on each device ({state // model / gib:.1f} GiB of "
            f"parameters and Adam moments, {temporaries / gib:.1f} GiB of step temporaries) and a "
            f"{devices[0].platform} device holds {limit / gib:.1f} GiB: lower sae.d_sae or train_batch_size_tokens, "
            "or split the latents over devices (model_axis_size)."
        )


def compile_step(make_step: Callable[[str | None], Callable], mesh: Mesh, batch_sharding: NamedSharding,
                 state_shardings: Any | None, compiler_options: dict | None) -> Callable:
    """The jitted step over `mesh`, the state donated.

    Args:
        make_step: axis name (or None) -> step(state, batch).
        state_shardings: the state's shardings where the latents are split (GSPMD), else None.
    """
    replicated = NamedSharding(mesh, P())
    if state_shardings is not None:
        # The plain step on the global batch; XLA partitions it (the top-k over sharded latents
        # included) and inserts the collectives. The state stays sharded between steps.
        step = make_step(None)

        def traced(state, batch):  # under the mesh: top-ks stay on their latent shard (latent_mesh)
            with latent_mesh(mesh):
                return step(state, batch)

        return jax.jit(traced, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=0, compiler_options=compiler_options)
    if mesh.devices.size == 1:
        return jax.jit(make_step(None), donate_argnums=0, compiler_options=compiler_options)
    sharded = jax.shard_map(make_step(DATA_AXIS), mesh=mesh, in_specs=(P(), batch_sharding.spec),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0, compiler_options=compiler_options)
