"""The one place activations cross between PyTorch and JAX."""

from __future__ import annotations

import jax
import torch

_ALIGNMENT = 64  # XLA copies CPU buffers whose data pointer is not 64-byte aligned


def torch_to_jax(t: torch.Tensor) -> jax.Array:
    """Hand a torch tensor to JAX without copying, through DLPack.

    Contract:
        dtype: float32 / bfloat16 / float16 (and int32) pass through unchanged; int64 becomes
            int32 when jax x64 is off (a copy).
        shape: kept. Non-contiguous tensors are made contiguous first (one copy), since DLPack
            import needs compact strides.
        device: the array lands on the JAX device matching the tensor's (CPU or the same GPU).
        grad: the tensor is detached; JAX never sees torch's autograd graph.
        aliasing: the result shares memory with `t` when `t` is contiguous and 64-byte aligned;
            do not write to `t` while the array is in use.
    """
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cpu" and t.data_ptr() % _ALIGNMENT:
        t = t.clone()  # an unaligned view would be copied silently by XLA anyway
    return jax.dlpack.from_dlpack(t)


def jax_to_torch(x: jax.Array) -> torch.Tensor:
    """Hand a JAX array to torch without copying (bf16 included)."""
    return torch.from_dlpack(x)
