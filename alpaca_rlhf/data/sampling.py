"""A seeded, resumable sampler: the same order for the same (seed, epoch), restartable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class SeededSampler(Sampler[int]):
    """Shuffles with `seed + epoch`; Lightning calls `set_epoch` at each epoch start.

    After a resume, `skip(epoch, n)` drops the first `n` indices of that epoch so that a run killed mid-epoch
    continues with the very next batch instead of repeating the epoch (Lightning re-creates the loader but
    cannot fast-forward a plain one). Under DDP Lightning substitutes its DistributedSampler, which replays
    the interrupted epoch from its start.
    """

    def __init__(self, length: int, seed: int = 42, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, epoch: int, n: int) -> None:
        self._skip = (epoch, n)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self):
        indices = self.order(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None
        return iter(indices)

    def __len__(self) -> int:
        return self.length
