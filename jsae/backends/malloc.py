"""glibc's malloc told to keep what a run frees, so the next batch reuses pages already mapped.

A training run allocates the same buffers batch after batch: the model forward's activations in
PyTorch, the shuffle buffer's batches, the step's arrays. By default glibc hands freed blocks of
128 KiB and more back to the kernel (mmap'd blocks are unmapped, the heap's top is trimmed), so
the next batch's buffers of the same size fault in fresh pages, which the kernel zero-fills one
4 KiB page at a time. `retain_freed_memory` sets, through mallopt(3):

- M_MMAP_THRESHOLD to 32 MiB, glibc's largest: blocks below it come from the heap;
- M_TRIM_THRESHOLD to 1 GiB: free memory at the heap's top stays mapped for reuse.

What must stay true: only allocation addresses and page faults change, never a number. The cost
is that a process keeps its peak heap (its RSS does not fall back after a peak). Blocks of 32 MiB
and more (XLA's largest temporaries) still come from mmap; huge pages (`hugepages.py`) serve those.

`jsae train` applies it at start-up; `JSAE_MALLOC=system` keeps glibc's defaults. From Python,
call `retain_freed_memory()` yourself before the run allocates.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

from jsae.backends.hugepages import _glibc_version

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more than HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
TRIM_THRESHOLD = 1 << 30

_applied = False


def retain_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's mmap and trim thresholds as the module docstring says; True where they are set.

    False (nothing changed) where `JSAE_MALLOC` is "system", where the C library is not glibc, or
    where mallopt refuses a value. Calling it again is harmless.
    """
    global _applied
    environ = os.environ if environ is None else environ
    if environ.get("JSAE_MALLOC", "retain") == "system" or _glibc_version() is None:
        return False
    if _applied:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
