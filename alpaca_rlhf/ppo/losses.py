"""Clipped PPO policy and value losses (docs/ppo.md §2.8-§2.10).

Means are token-level over the whole minibatch (Σ x·m / Σ m), not per-sequence means, as in TRL and OAI.
"""

import torch
from torch import Tensor

from alpaca_rlhf.ppo.advantages import masked_mean


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective -min(A·r, A·clip(r, 1-ε, 1+ε)), r = π_θ / π_old (Schulman et al., 2017).

    Args:
        logprobs: (B, T) log π_θ(y_t) from the current forward pass, with grad.
        old_logprobs: (B, T) rollout log π_old(y_t), a constant.
        advantages: (B, T) (whitened) advantages, a constant.
        mask: (B, T) valid-token mask.
        clip_range: ε.

    Returns:
        (loss, stats): the scalar loss, and detached scalars `clipfrac` (fraction of valid tokens where the
        clipped branch is the larger loss, TRL's definition), `approx_kl` (½·mean((log r)²), k2),
        `policy_kl` (mean(log π_old - log π_θ), k1 of KL(old‖new)), `ratio` (mean r) and `ratio_max`.
    """
    valid = mask.bool()
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), valid)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), valid),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, valid),
            "policy_kl": masked_mean(-log_ratio, valid),
            "ratio": masked_mean(ratio, valid),
            # The ratio is > 0, so 0 at padding never wins the max.
            "ratio_max": torch.where(valid, ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip_range: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, ½·mean(max((V - R)², (V_clip - R)²)) (docs/ppo.md §2.8).

    Args:
        values: (B, T) V_φ(s_t) from the current forward pass, with grad.
        old_values: (B, T) rollout values, a constant.
        returns: (B, T) GAE returns, a constant.
        mask: (B, T) valid-token mask.
        value_clip_range: ε_v, V_clip = clamp(V, V_old - ε_v, V_old + ε_v); None gives the plain squared
            error.

    Returns:
        (loss, stats): the scalar loss, and detached scalars `value_clipfrac` (fraction of valid tokens where
        the clipped error is the larger) and `value_mean` (mean predicted value).
    """
    valid = mask.bool()
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if value_clip_range is None:
        loss = 0.5 * masked_mean(unclipped, valid)
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old_values = old_values.detach()
        values_clipped = torch.clamp(values, old_values - value_clip_range, old_values + value_clip_range)
        clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), valid)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), valid)
    stats = {"value_clipfrac": clipfrac.detach(), "value_mean": masked_mean(values, valid).detach()}
    return loss, stats
