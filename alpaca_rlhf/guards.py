"""Non-finite guards: a NaN/inf never reaches the weights, a checkpoint or an export."""

from __future__ import annotations

import torch


def assert_finite(tensors: dict, what: str) -> None:
    """Refuses to write `what` (a checkpoint or an export) holding NaN/inf weights; names the first bad tensor."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"refusing to write {what}: {name} holds NaN/inf values")


MAX_NONFINITE_SKIPS = 3


def skip_nonfinite(module, loss, batch_idx: int) -> bool:
    """True (skip this batch: no backward, no step) when the loss is NaN/inf; warns with the step, and stops the
    run after `MAX_NONFINITE_SKIPS` in a row. SFT and the reward model call it from `training_step`."""
    from lightning.pytorch.utilities import rank_zero_warn

    if bool(torch.isfinite(loss)):
        module.consecutive_nonfinite = 0
        return False
    module.consecutive_nonfinite = getattr(module, "consecutive_nonfinite", 0) + 1
    rank_zero_warn(f"step {module.global_step} (batch {batch_idx}): non-finite loss {loss.item()}; batch skipped, "
                   "no weight changed")
    if module.consecutive_nonfinite >= MAX_NONFINITE_SKIPS:
        raise FloatingPointError(f"{module.consecutive_nonfinite} batches in a row had a non-finite loss; stopping "
                                 "(the last checkpoint holds the last finite weights)")
    return True


def gradients_finite(parameters) -> bool:
    """Whether every gradient is finite (one device sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def nonfinite_rollout(rollout, raw_scores, trainer=None) -> list[str]:
    """Names of an online rollout's tensors holding NaN/inf on any rank (every rank decides alike)."""
    named = {"scores": raw_scores, "rewards": rollout.rewards, "advantages": rollout.advantages,
             "returns": rollout.returns, "values": rollout.values, "logprobs": rollout.logprobs}
    named = {k: v for k, v in named.items() if v is not None}
    bad = torch.tensor([float(not torch.isfinite(t).all()) for t in named.values()], device=raw_scores.device)
    if trainer is not None and trainer.world_size > 1:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    return [name for name, flag in zip(named, bad.tolist(), strict=True) if flag > 0]
