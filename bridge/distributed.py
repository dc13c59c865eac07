"""Several processes (hosts, or one process per GPU) training one SAE from the command line.

`jsae train` joins `jax.distributed` when given `--coordinator/--num-processes/--process-id`, or
when started by a cluster launcher whose environment JAX detects (SLURM with several tasks, Open
MPI's mpirun, or JAX_COORDINATOR_ADDRESS set). Each process then runs its own model replica on
its own devices over its own share of the token rows, and hands the trainer its part of every
batch; the trainer's mesh spans all processes' devices, and only process 0 writes the SAE folder,
the metrics and the plots.

The token rows are dealt into `data_shards` shards (default: one per process), row r to shard
r % data_shards, each shard with its own shuffle buffer and seed (seed + shard). A process
trains on the shards `process_index, process_index + n_processes, ...` (one or more), so a run
sees the same batches on any number of processes that divides `data_shards`: one process with
`data_shards: 2` trains the SAE that two processes train.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jsae import ConfigError

# Variables whose presence says a cluster launcher started this process as one of several.
_LAUNCHERS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}


def launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster launcher that started this process as one of several (JAX can then find the
    coordinator itself), or None."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for variable, name in _LAUNCHERS.items():
        try:
            if int(environ.get(variable, "1")) > 1:
                return name
        except ValueError:
            continue
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
    """Join `jax.distributed` for a multi-process run; must run before anything starts JAX's backend.

    Args:
        coordinator: "host:port" of process 0's coordinator service; with num_processes and process_id.
        num_processes, process_id: this run's process count and this process's index.

    Returns:
        Whether this process joined a multi-process run (False: a plain single-process run).
    """
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together: give all three "
                          "(or none, under a cluster launcher JAX detects).")
    import jax

    if coordinator is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id must be in [0, --num-processes={num_processes}), got {process_id}.")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if launcher(environ) is None:
        return False
    jax.distributed.initialize()  # the launcher's environment names the coordinator and this process
    return jax.process_count() > 1


def local_shards(data_shards: int | None) -> tuple[list[int], int]:
    """(this process's shards, the number of shards) for a run's `data_shards` setting."""
    import jax

    n, index = jax.process_count(), jax.process_index()
    shards = data_shards or n
    if shards % n:
        raise ConfigError(f"data_shards={shards} must be a multiple of the {n} processes of the run "
                          "(each process trains on the same number of shards).")
    return list(range(index, shards, n)), shards


def deal(rows: Iterable, shard: int, shards: int) -> Iterator:
    """Every `shards`-th element of `rows`, from the `shard`-th: one shard of the token rows."""
    for i, row in enumerate(rows):
        if i % shards == shard:
            yield row


def joined(sources: list[Iterable]) -> Iterator[Any]:
    """One batch from each shard's source, side by side along the token axis (dicts hook by hook), on the
    device the batches are on."""
    import jax.numpy as jnp

    if len(sources) == 1:
        yield from sources[0]
        return
    for parts in zip(*sources, strict=False):
        if isinstance(parts[0], Mapping):
            yield {hook: jnp.concatenate([p[hook] for p in parts]) for hook in parts[0]}
        else:
            yield jnp.concatenate(parts)


def process_slice(batches: Iterable, n_processes: int, index: int) -> Iterator[Any]:
    """This process's contiguous share of every global batch (cached activations, which every process can read)."""
    for batch in batches:
        if isinstance(batch, Mapping):
            yield {hook: _rows(v, n_processes, index) for hook, v in batch.items()}
        else:
            yield _rows(batch, n_processes, index)


def _rows(array, n: int, index: int):
    size = array.shape[0] // n
    return array[index * size:(index + 1) * size]
