"""Primitives for feature sharding: the latents split over the mesh's model axis.

With the latents of a (tokens, d_sae) array split over `shards` devices, a plain row top-k makes
XLA gather the whole row on every device first: each device then holds the full (tokens, d_sae)
pre-activations, and a wider SAE saves no activation memory. `sharded_top_k` takes each shard's
top k where the shard lies (a top-k over the last axis of a (tokens, shards, d_sae / shards)
view, whose middle axis is the sharded one) and then the top k of the shards · k candidates, so
only (tokens, shards · k) values cross devices.

The result equals `jax.lax.top_k` exactly, ties included: a row's k largest entries are among
the k largest of each shard, and the candidates are laid out in shard order (lower latent
indices first), so among equal values the second top-k, like lax.top_k, keeps the lower index.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jsae.saes import _ops

Array = jax.Array

# The mesh axes of a training run (jsae.training.mesh): tokens split over DATA_AXIS, latents over MODEL_AXIS.
DATA_AXIS = "data"
MODEL_AXIS = "model"


def sharded_top_k(x: Array, k: int, *, shards: int, row_top_k=_ops.top_k) -> tuple[Array, Array]:
    """`jax.lax.top_k(x, k)` along the last axis, taken shard by shard.

    Traced under the run's mesh (`latent_mesh`), each device takes the top k of its own shard
    (`jax.shard_map`: XLA's partitioner would otherwise gather whole rows for a top-k); without
    that mesh the same two stages run on a (..., shards, m / shards) view, with the same result.

    Args:
        x: (..., m) with m split (or to be split) over `shards` devices along the last axis.
        k: how many entries to keep per row.
        shards: the model axis size; 1, or a shard holding fewer than k entries, takes one top-k.
        row_top_k: the top-k each stage uses.

    Returns:
        (values, indices) as lax.top_k returns them, with lax.top_k's gradient for the values.
    """
    m = x.shape[-1]
    if shards <= 1 or m % shards or m // shards < k:
        return row_top_k(x, k)
    width = m // shards
    lead = x.shape[:-1]
    mesh = jax.sharding.get_abstract_mesh()
    if MODEL_AXIS in mesh.axis_names and mesh.shape[MODEL_AXIS] == shards:
        def local(block):
            values, indices = row_top_k(block, k)
            return values, indices + jax.lax.axis_index(MODEL_AXIS).astype(indices.dtype) * width

        data = DATA_AXIS if DATA_AXIS in mesh.axis_names and lead and lead[0] % mesh.shape[DATA_AXIS] == 0 else None
        spec = P(data, *([None] * (len(lead) - 1)), MODEL_AXIS) if lead else P(MODEL_AXIS)
        local_values, candidates = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(x)
    else:
        local_values, local_indices = row_top_k(x.reshape(*lead, shards, width), k)  # one top-k per shard
        offsets = (jnp.arange(shards, dtype=local_indices.dtype) * width)[:, None]
        local_values = local_values.reshape(*lead, shards * k)
        candidates = (local_indices + offsets).reshape(*lead, shards * k)
    values, position = row_top_k(local_values, k)
    return values, jnp.take_along_axis(candidates, position, axis=-1)


@contextlib.contextmanager
def latent_mesh(mesh):
    """Trace a feature-sharded step under this: `sharded_top_k` then keeps each top-k on its shard."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def sharded_ops(ops: _ops.Ops, shards: int) -> _ops.Ops:
    """`ops` with its row top-k taken shard by shard over `shards` latent shards."""
    if shards <= 1:
        return ops
    return ops.replace(top_k=_ShardedTopK(shards, ops.top_k))


class _ShardedTopK:
    """`sharded_top_k` with its shards and row top-k bound; hashable by value (the Ops bundle is a
    static argument of jit, so equal plans must give equal bundles)."""

    def __init__(self, shards: int, row_top_k):
        self.shards, self.row_top_k = shards, row_top_k

    def __call__(self, x: Array, k: int) -> tuple[Array, Array]:
        return sharded_top_k(x, k, shards=self.shards, row_top_k=self.row_top_k)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ShardedTopK) and (self.shards, self.row_top_k) == (other.shards, other.row_top_k)

    def __hash__(self) -> int:
        return hash((_ShardedTopK, self.shards, self.row_top_k))
