"""Data order as a pure function of (seed, epoch), resumable at any micro-batch.

Micro-batch ``n`` of the run (counting over all epochs) is the same set of examples whether the
run is fresh, resumed, or split over processes: epoch ``e`` is a permutation drawn from a
generator seeded with (seed, e); a global micro-batch of ``batch_size * world_size`` consecutive
indices is cut from it, and rank ``r`` takes its ``r``-th slice. The incomplete tail of an epoch is
dropped so every micro-batch has the same size (gradient accumulation stays exact).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches of indices into a data set of ``num_items`` examples, from ``start``."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True):
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise ValueError(
                f"the data set has {num_items} items, fewer than one global batch "
                f"(batch_size={batch_size} x {world_size} processes)"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start, self.shuffle = rank, world_size, start, shuffle
        self.batches_per_epoch = num_items // global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Permutation of epoch ``epoch`` (identity without shuffle)."""
        if not self.shuffle:
            return torch.arange(self.num_items)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # any injective-enough mix
        return torch.randperm(self.num_items, generator=g)

    def batch(self, n: int) -> list[int]:
        """This rank's indices of micro-batch ``n``."""
        epoch, i = divmod(n, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        lo = (i * self.world_size + self.rank) * self.batch_size
        return order[lo : lo + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        n, epoch, order = self.start, None, None
        while True:
            e, i = divmod(n, self.batches_per_epoch)
            if e != epoch:  # one permutation per epoch, not per batch
                epoch, order = e, self.epoch_order(e)
            lo = (i * self.world_size + self.rank) * self.batch_size
            yield order[lo : lo + self.batch_size].tolist()
            n += 1

    def __len__(self) -> int:  # one epoch's worth; iteration itself never ends
        return self.batches_per_epoch
