"""The one place activations cross between PyTorch and JAX."""

from __future__ import annotations

import contextlib

import jax
import torch

_ALIGNMENT = 64  # XLA copies CPU buffers whose data pointer is not 64-byte aligned


def device_context(t) -> contextlib.AbstractContextManager:
    """The context a hand-off of `t` runs in: `torch.cuda.device(t.device)` for a CUDA tensor, nothing otherwise.

    torch's `__dlpack__` refuses (BufferError) a tensor on a GPU other than the current one, and it orders
    the hand-off after the current stream of the current device: inside this context both are the
    tensor's own, whichever GPU it is on. Building the context touches no GPU; entering it does.
    """
    device = t.device
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
    with device_context(t):
        if not t.is_contiguous():
            t = t.contiguous()
        if t.device.type == "cpu" and t.data_ptr() % _ALIGNMENT:
            t = t.clone()  # an unaligned view would be copied silently by XLA anyway
        return jax.dlpack.from_dlpack(t)


def jax_to_torch(x: jax.Array) -> torch.Tensor:
    """Hand a JAX array to torch without copying (bf16 included); on a GPU, ordered after the current
    stream of the array's own device (see `device_context`)."""
    device = x.__dlpack_device__()
    if device[0] == 2:  # kDLCUDA
        with torch.cuda.device(device[1]):
            return torch.from_dlpack(x)
    return torch.from_dlpack(x)
