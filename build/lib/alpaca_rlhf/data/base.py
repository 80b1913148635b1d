"""Shared plumbing for the stage DataModules: the tokenizer hand-off and resumable data order."""

from __future__ import annotations

import logging

import lightning as L
from torch.utils.data import DataLoader, Dataset

from alpaca_rlhf.data.sampling import SeededSampler

log = logging.getLogger(__name__)


class TokenizedDataModule(L.LightningDataModule):
    """A DataModule whose tokenizer comes from the LightningModule (late binding, as litgpt's `connect`).

    The model defines the tokenizer (its pad token, padding side and vocabulary), so the data module takes it
    from `connect(tokenizer)` or, if nobody called that, from `trainer.lightning_module.tokenizer` at setup.
    """

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.tokenizer = None
        self._sampler: SeededSampler | None = None
        self._resume: dict | None = None

    def connect(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _require_tokenizer(self):
        if self.tokenizer is None and self.trainer is not None:
            self.tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__} has no tokenizer: call connect(tokenizer) before setup")
        return self.tokenizer

    def _train_loader(self, dataset: Dataset, collate_fn, drop_last: bool = False) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._sampler = SeededSampler(len(dataset), seed=self.seed, num_replicas=world, rank=rank)
        if self._resume:
            # resume mid-epoch: skip the batches this rank already trained on (its own count, its own share)
            self._sampler.skip(self._resume["epoch"], self._resume["batches_done"] * self.batch_size)
            self._resume = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            drop_last=drop_last,
        )

    def _eval_loader(self, dataset: Dataset, collate_fn) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_fn,
                          num_workers=self.num_workers)

    def state_dict(self) -> dict:
        # batches whose training step ran in the current epoch: Lightning's own count, saved with the checkpoint
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("batches_done"):
            self._resume = dict(state_dict)
