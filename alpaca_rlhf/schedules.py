"""Learning-rate schedules for YAML injection (`scheduler: {class_path: alpaca_rlhf.schedules.WarmupDecayLR}`)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class _WarmupDecay:
    # a callable object (not a closure) so LambdaLR.state_dict saves its fields and a resume restores them
    def __init__(self, warmup_steps: int, total_steps: int | None, decay: str, min_lr_ratio: float) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.decay, self.min_lr_ratio = decay, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant" or not self.total_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class WarmupDecayLR(LambdaLR):
    """Linear warmup, then linear or cosine decay to `min_lr_ratio` of the peak, stepped per optimizer step.

    Args:
        optimizer: The optimizer whose learning rate is scheduled.
        warmup_steps: Steps of linear warmup from ~0 to the peak learning rate.
        total_steps: Steps until the end of the decay; None takes Lightning's `estimated_stepping_batches`
            (the LightningModule fills it in).
        decay: "linear", "cosine" or "constant".
        min_lr_ratio: Final learning rate as a fraction of the peak.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int | None = None,
                 decay: str = "linear", min_lr_ratio: float = 0.0) -> None:
        if decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"decay must be linear, cosine or constant, got {decay!r}")
        # kept only in lr_lambdas: LambdaLR saves an object lambda's fields as a plain dict (weights_only-safe)
        super().__init__(optimizer, _WarmupDecay(warmup_steps, total_steps, decay, min_lr_ratio))

    @property
    def total_steps(self) -> int | None:
        return self.lr_lambdas[0].total_steps

    @total_steps.setter
    def total_steps(self, value: int) -> None:
        self.lr_lambdas[0].total_steps = value


def scheduler_config(scheduler, trainer) -> dict:
    """Lightning's lr_scheduler dict, stepping per optimizer step, with `total_steps` taken from the trainer."""
    if getattr(scheduler, "total_steps", 0) is None:
        scheduler.total_steps = int(trainer.estimated_stepping_batches)
    return {"scheduler": scheduler, "interval": "step"}


def online_optimizer_steps(trainer, samples_per_prompt: int, epochs: int, mini_batch_size: int | None) -> int:
    """An online run's optimizer steps: `max_steps` when set (it counts optimizer steps there), else the planned
    iterations x epochs x minibatches per iteration (Lightning's estimate counts batches, i.e. iterations)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    iterations = int(trainer.estimated_stepping_batches)
    datamodule = getattr(trainer, "datamodule", None)
    batch = getattr(datamodule, "batch_size", None)
    if not batch:
        return iterations
    completions = batch * samples_per_prompt
    minibatches = -(-completions // (mini_batch_size or completions))
    return iterations * epochs * minibatches
