"""A seeded, resumable sampler that knows its rank: the same order for the same (seed, epoch), restartable
mid-epoch, one process or many."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler


class SeededSampler(DistributedSampler):
    """Shuffles with `seed + epoch` and hands rank `rank` of `num_replicas` its share; Lightning calls `set_epoch`.

    It is a `DistributedSampler`, so under DDP Lightning keeps it instead of wrapping it in its own
    `DistributedSamplerWrapper` (which indexes by the full length and cannot skip). Like `DistributedSampler`,
    the epoch's permutation is padded by repetition to a multiple of `num_replicas` and rank r takes every
    `num_replicas`-th index from position r. After a resume, `skip(epoch, n)` drops the first `n` indices of
    this rank's share of that epoch: `n` = batches this rank trained x batch size, so a run killed mid-epoch
    continues every rank with its very next batch.
    """

    def __init__(self, length: int, seed: int = 42, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.length = length
        self._skip: tuple[int, int] | None = None

    def skip(self, epoch: int, n: int) -> None:
        self._skip = (epoch, n)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of `epoch`, before any skip."""
        if not self.shuffle:
            indices = list(range(self.length))
        else:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            indices = torch.randperm(self.length, generator=generator).tolist()
        indices += indices[: self.total_size - len(indices)]  # pad to a multiple of num_replicas
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):
        indices = self.order(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples
