"""Batch sources for `jsae.train` when the activations are already in memory or on disk, and the
check every batch passes before a step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from jsae._errors import InputError

if TYPE_CHECKING:
    from jsae.training.config import TrainConfig


def check_batch(batch: Any, cfg: TrainConfig, n_processes: int, streams: int | None) -> None:
    """Raise InputError unless `batch` is this process's share of a training batch: real floats of shape
    (train_batch_size_tokens / n_processes, batch_width), with `streams` activation streams stacked in
    front ((streams, tokens, batch_width)) where a sweep reads several."""
    shape = tuple(getattr(batch, "shape", ()))
    local, d_in = cfg.train_batch_size_tokens // n_processes, cfg.sae.batch_width
    # a transcoder's rows hold its input and target side by side
    width = "d_in" if d_in == cfg.sae.d_in else "d_in + d_out"
    expected = (local, d_in) if streams is None else (streams, local, d_in)
    if len(shape) != len(expected) or shape[-1] != d_in or (streams is not None and shape[0] != streams):
        want = f"({local}, {width}={d_in})" if streams is None else f"(n_streams={streams}, {local}, {width}={d_in})"
        raise InputError(f"batch: expected shape {want} of activations"
                         + (" (one slice per activation stream)" if streams is not None else "")
                         + f", got {shape}; the SAE config's {width} must match the activations' width.")
    dtype = np.dtype(getattr(batch, "dtype", np.float32))
    if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
        raise InputError(f"batch: activations must be real floating-point numbers, got dtype {dtype}.")
    if shape[-2] != local:
        raise InputError(f"batch: expected {local} tokens per process (train_batch_size_tokens="
                         f"{cfg.train_batch_size_tokens} over {n_processes} process(es)), got {shape[-2]}.")


class ArrayBatches:
    """Endless, reproducible batches from an in-memory (tokens, d_in) array.

    Each epoch visits the tokens in a fresh permutation drawn from `seed` (or in order with
    shuffle=False). `seek(n)` jumps to batch n, so a resumed run continues exactly where it
    stopped without replaying data.

    Args:
        data: (tokens, d_in) array (numpy, memory-mapped or anything numpy can index).
        batch_size: tokens per batch.
        shuffle: permute tokens every epoch.
        seed: seed of the permutations.
    """

    def __init__(self, data, batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if batch_size <= 0 or batch_size > len(data):
            raise ValueError(f"batch_size must be in [1, {len(data)}], got {batch_size}.")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.position = 0
        self._batches_per_epoch = len(data) // batch_size

    def seek(self, n: int) -> None:
        """Make batch n the next one served."""
        self.position = n

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.data))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def __iter__(self) -> Iterator[np.ndarray]:
        cached_epoch, order = None, None
        while True:
            epoch, index = divmod(self.position, self._batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self._order(epoch)
            rows = np.sort(order[index * self.batch_size : (index + 1) * self.batch_size])
            self.position += 1
            yield np.asarray(self.data[rows])
