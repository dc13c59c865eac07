"""Batch sources for `jsae.train` when the activations are already in memory or on disk."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


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
