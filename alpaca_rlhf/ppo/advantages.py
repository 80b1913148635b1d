"""Masked statistics, whitening and GAE over response tokens (docs/ppo.md §2.6, §2.7).

Every `mask` argument is (B, T), bool or {0, 1}, with 1 on response tokens through the first EOS.
Masked positions never enter a statistic: they are selected away with `torch.where`, so even inf or NaN
padding cannot leak.
"""

import warnings

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over valid positions.

    Args:
        x: (B, T) values.
        mask: (B, T) valid-token mask.
        dim: reduce over this dimension only; None reduces everything.

    Returns:
        A scalar, or `x` reduced over `dim`.
    """
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over valid positions; a token-level mean when `dim` is None (docs/ppo.md §2.9).

    Args:
        x: (B, T) values.
        mask: (B, T) valid-token mask.
        dim: reduce over this dimension only; None reduces everything.

    Returns:
        A scalar, or `x` reduced over `dim`. NaN where a reduction has no valid position.
    """
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all valid positions (`trl/core.py` `masked_var`).

    Args:
        x: (B, T) values.
        mask: (B, T) valid-token mask.
        unbiased: apply Bessel's correction n/(n-1) as TRL does; False gives the ÷n variance of NPLUS,
            OAI and OpenRLHF (docs/ppo.md §2.7).

    Returns:
        Scalar variance. With a single valid token the unbiased estimate is undefined (TRL divides by
        zero); it falls back to the biased value, 0, with a warning.

    Raises:
        ValueError: if no position is valid.
    """
    count = mask.to(x.dtype).sum()
    n = int(count.item())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if not unbiased:
        return var
    if n == 1:
        warnings.warn("masked_var: one valid element, returning the biased variance 0", stacklevel=2)
        return var
    return var * count / (count - 1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True) -> Tensor:
    """Normalise `x` with statistics of its valid positions (`trl/core.py` `masked_whiten`).

    Args:
        x: (B, T) values.
        mask: (B, T) valid-token mask.
        shift_mean: False adds the mean back, dividing by the standard deviation only (reward whitening).
        unbiased: Bessel's correction for the variance, see `masked_var`.

    Returns:
        (B, T) (x - μ) · rsqrt(σ² + 1e-8) [+ μ]. Masked positions are transformed too but never enter μ or
        σ²; callers mask them downstream.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


@torch.no_grad()
def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al., 2016) over response tokens.

    Values and rewards are zeroed outside the mask before the loop, so the bootstrap after the last valid
    token is 0 and no padding value reaches δ (docs/ppo.md §2.6, §3 item 7).

    Args:
        values: (B, T) value estimates recorded during the rollout.
        rewards: (B, T) per-token rewards from `kl_penalized_rewards`.
        mask: (B, T) 1 on response tokens through EOS, 0 on padding.
        gamma: discount γ.
        lam: GAE λ; 1 gives Monte Carlo returns minus V, 0 gives the one-step TD error.

    Returns:
        (advantages, returns), each (B, T), zero on padding; returns = advantages + values, taken from the
        raw advantages before any whitening.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(valid, values, zero)
    rewards = torch.where(valid, rewards.to(values.dtype), zero)
    length = values.shape[1]
    advantages_reversed = []
    last_gae_lam = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lam = delta + gamma * lam * last_gae_lam
        advantages_reversed.append(last_gae_lam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    # Padding has zero reward and value, so its δ and advantage are already 0; `where` makes it explicit.
    advantages = torch.where(valid, advantages, zero)
    returns = advantages + values
    return advantages, returns


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the variance of the returns that the critic explains.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) GAE returns.
        mask: (B, T) valid-token mask.

    Returns:
        Scalar 1 - Var[returns - values] / Var[returns] over valid tokens: 1 for a perfect critic, 0 for any
        constant one, negative when worse. NaN or inf when the returns are constant.
    """
    # Both variances share n, so Bessel's correction cancels; the biased form also works for n = 1.
    return 1 - masked_var(returns - values, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)
