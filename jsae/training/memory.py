"""What one training step needs on each device, from XLA's memory analysis of the compiled step."""

from __future__ import annotations

import math
from typing import Any

import jax

GIB = 1 << 30


def shard_bytes(tree: Any) -> int:
    """Bytes of one device's shards of `tree` (ShapeDtypeStructs or arrays carrying shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def step_memory(lowered_state: Any, compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled training step.

    Args:
        lowered_state: the state the step was lowered with (ShapeDtypeStructs with shardings).
        compiled: the compiled step (`jax.stages.Compiled`).

    Returns:
        params_and_optimizer: the state's shard on one device (parameters, Adam moments, counters);
        step_temporaries: XLA's temporaries of one step (`temp_size_in_bytes`).
    """
    analysis = compiled.memory_analysis()
    return {"params_and_optimizer": shard_bytes(lowered_state),
            "step_temporaries": int(getattr(analysis, "temp_size_in_bytes", 0) or 0)}


def describe_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def refuse_if_too_large(need: dict[str, int], device) -> None:
    """A ConfigError where `need` (per-device bytes) exceeds what `device` holds."""
    from jsae._errors import ConfigError
    from jsae.backends import device_memory_bytes

    limit = device_memory_bytes(device)
    if limit is not None and sum(need.values()) > limit:
        parts = ", ".join(f"{name} {describe_bytes(n)}" for name, n in need.items())
        raise ConfigError(f"one training step needs {describe_bytes(sum(need.values()))} on each device ({parts}) and "
                          f"a {device.platform} device holds {describe_bytes(limit)}: lower sae.d_sae or "
                          "train_batch_size_tokens, or split the latents over devices (model_axis_size).")
