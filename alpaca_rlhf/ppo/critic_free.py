"""Critic-free advantages and losses: RLOO and GRPO (docs/algorithms.md). Plain torch.

Groups are contiguous rows: the k completions of one prompt are rows `i*k ... i*k + k - 1` (`rewards.view(-1, k)`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alpaca_rlhf.ppo.advantages import masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
"""Loss reductions over a minibatch's valid tokens (docs/algorithms.md, "Loss reductions"):
- `grpo`: mean over each sequence's valid tokens, then mean over sequences (Shao et al. 2024, the paper);
- `bnpo` / `dapo`: sum over all valid tokens of the minibatch / their count (DAPO, Yu et al. 2025; TRL's "dapo":
  the normaliser is the whole minibatch's token count, whatever the gradient accumulation);
- `dr_grpo`: sum over valid tokens / (sequences x max completion length), a constant (Liu et al. 2025)."""


def _groups(rewards: Tensor, k: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"rewards must be (B,) with B a multiple of k={k}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, k)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages A_i = r_i - mean_{j != i} r_j (Ahmadian et al. 2024; TRL's RLOOTrainer).

    Args:
        rewards: (B,) sequence rewards (score minus beta x the sequence KL), B = prompts x k, groups contiguous.
        k: Completions per prompt, >= 2 (one completion has no baseline).

    Returns:
        (B,) advantages; equal to k/(k-1) x (r_i - group mean).
    """
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt for its leave-one-out baseline, got k={k}")
    r = _groups(rewards, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(rewards: Tensor, k: int, scale_rewards: bool = True, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Group-normalised advantages (Shao et al. 2024): (r_i - mean(group)) / (std(group) + eps).

    Args:
        rewards: (B,) sequence rewards, groups of k contiguous rows.
        k: Completions per prompt, >= 2 (torch's unbiased std of one value is NaN).
        scale_rewards: Divide by the group's std (unbiased, torch's default); False = Dr. GRPO (Liu et al. 2025).
        eps: Added to the std: a group whose rewards are all equal gets advantage 0, not NaN.

    Returns:
        ((B,) advantages, (B // k,) bool: groups whose rewards are all equal, TRL's `frac_reward_zero_std`).
    """
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 completions per prompt to normalise within a group, got k={k}")
    r = _groups(rewards, k)
    std = r.std(1, keepdim=True)  # unbiased, as TRL and docs/algorithms.md
    advantages = r - r.mean(1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (std + eps)
    return advantages.reshape(-1), std.squeeze(1) == 0


def reinforce_baseline_advantages(rewards: Tensor, k: int, eps: float = 1e-4) -> Tensor:
    """REINFORCE++-baseline advantages (Hu et al. 2025): the group's mean as the baseline, then one scale for the
    whole batch, `(r_i - mean(group)) / (std over the batch of those differences + eps)`.

    Unlike GRPO's per-group std, a group whose rewards barely differ keeps small advantages.

    Args:
        rewards: (B,) sequence rewards, groups of k contiguous rows.
        k: Completions per prompt, >= 2.
        eps: Added to the std: a batch whose rewards are equal within every group gets advantage 0, not NaN.

    Returns:
        (B,) advantages with mean 0 over the batch.
    """
    if k < 2:
        raise ValueError(f"REINFORCE++-baseline needs at least 2 completions per prompt for its baseline, got k={k}")
    r = _groups(rewards, k)
    centred = (r - r.mean(1, keepdim=True)).reshape(-1)
    return centred / (centred.std() + eps)  # unbiased std over the batch


def clipped_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, epsilon: float,
                      epsilon_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate -min(A r, A clip(r, 1 - eps, 1 + eps_high)), r = pi / pi_old.

    Args:
        logprobs: (B, T) log pi of the sampled tokens, with grad.
        old_logprobs: (B, T) rollout log-probs, a constant.
        advantages: (B,) a sequence advantage (broadcast to every token) or (B, T).
        mask: (B, T) valid tokens.
        epsilon: Lower clip; `epsilon_high` the upper one (DAPO's clip-higher), None = `epsilon`.

    Returns:
        ((B, T) per-token loss, zero outside the mask; detached stats over valid tokens: `ratio`, `ratio_max`,
        `policy_kl` (k1 of KL(old || new)), `approx_kl`, and TRL's `clip_ratio/low_mean`, `clip_ratio/high_mean`,
        `clip_ratio/region_mean`).
    """
    valid = mask.bool()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[:, None]
    high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - epsilon, 1.0 + high) * adv)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    with torch.no_grad():
        low_clipped = (ratio < 1.0 - epsilon) & (adv < 0)
        high_clipped = (ratio > 1.0 + high) & (adv > 0)
        f = lambda x: masked_mean(x.to(ratio.dtype), valid)  # noqa: E731
        stats = {"ratio": masked_mean(ratio, valid), "ratio_max": torch.where(valid, ratio, 0.0).max(),
                 "policy_kl": masked_mean(-log_ratio, valid), "approx_kl": 0.5 * masked_mean(log_ratio**2, valid),
                 "clip_ratio/low_mean": f(low_clipped), "clip_ratio/high_mean": f(high_clipped),
                 "clip_ratio/region_mean": f(low_clipped | high_clipped)}
    return per_token, stats


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate exp(ref - logp) - (ref - logp) - 1 (Schulman 2020; GRPO's in-loss KL)."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


def reduce_loss(per_token: Tensor, mask: Tensor, loss_type: str, max_length: int | None = None) -> Tensor:
    """A (micro-)batch's loss from (B, T) per-token losses under one of `LOSS_TYPES`.

    Across micro-batches, weight `grpo` and `dr_grpo` by the share of the minibatch's sequences and `bnpo` by
    the share of its valid tokens (`micro_weight`): the weighted sum is then the whole minibatch's loss.
    """
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_length:
            raise ValueError("dr_grpo divides by the maximum completion length: give max_length")
        return (per_token * m).sum() / (per_token.shape[0] * max_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
