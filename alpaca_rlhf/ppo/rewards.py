"""Per-token KL estimators, score processing and the KL-penalised reward (docs/ppo.md §2.3-§2.5)."""

from typing import Protocol

import torch
from torch import Tensor

from alpaca_rlhf.ppo.advantages import masked_whiten
from alpaca_rlhf.ppo.logprobs import sequence_lengths


class KLEstimator(Protocol):
    """A per-token estimate of KL(π‖π_ref) from the log-probs of the sampled tokens."""

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        """Map (B, T) log π and (B, T) log π_ref of the sampled tokens to a (B, T) estimate."""
        ...


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Return log π - log π_ref: unbiased, can be negative; the default of TRL, OAI, NPLUS and OpenRLHF."""
    return logprobs - ref_logprobs


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Return |log π - log π_ref| (TRL-old `kl_penalty="abs"`)."""
    return (logprobs - ref_logprobs).abs()


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Return ½ (log π - log π_ref)²: non-negative, biased (TRL-old `kl_penalty="mse"`)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Return (r - 1) - log r with r = π_ref / π: non-negative and unbiased (Schulman, 2020)."""
    log_ratio = ref_logprobs - logprobs
    # expm1 keeps the estimate accurate, and >= 0, when the log-ratio is near 0.
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "abs": kl_abs, "k2": kl_k2, "k3": kl_k3}
"""Named estimators accepted by `approx_kl`; add an entry to make a new one selectable by name."""


def approx_kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: str | KLEstimator = "k1") -> Tensor:
    """Per-token KL estimate between the policy and the reference on the sampled tokens.

    Args:
        logprobs: (B, T) log π(y_t) of the sampled tokens.
        ref_logprobs: (B, T) log π_ref(y_t) of the same tokens.
        estimator: a key of `KL_ESTIMATORS` ("k1", "k2", "k3", "abs") or a callable
            `(logprobs, ref_logprobs) -> (B, T)`.

    Returns:
        (B, T) per-token estimate, unmasked.

    Raises:
        ValueError: for an unknown estimator name.
    """
    if callable(estimator):
        return estimator(logprobs, ref_logprobs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def process_scores(
    scores: Tensor,
    *,
    contains_eos: Tensor | None = None,
    missing_eos_penalty: float | None = None,
    score_clip: float | None = None,
    score_bias: float = 0.0,
    response_lengths: Tensor | None = None,
    min_response_tokens: int | None = None,
    short_response_penalty: float | None = None,
) -> Tensor:
    """Centre, clip and penalise reward-model scores before they enter the reward (docs/ppo.md §2.4).

    Applied in that order: s - bias (NPLUS centring), clip to [-c, c] (TRL-old `score_clip`), then
    subtract the penalty from responses without EOS (TRL-new `missing_eos_penalty`, which subtracts rather
    than replaces as OAI/NPLUS do), then subtract `short_response_penalty` from responses of fewer than
    `min_response_tokens` tokens (an early EOS: OpenAI's lm-human-preferences gave -1 unless the stop token came
    after token N; subtracted here, like the EOS penalty).

    Args:
        scores: (B,) reward-model scores.
        contains_eos: (B,) bool, whether each truncated response holds a stop token; required with a penalty.
        missing_eos_penalty: amount subtracted from scores of responses without EOS; None disables it.
        score_clip: clip bound c > 0; None disables clipping.
        score_bias: subtracted from every score so that reference responses score about 0.
        response_lengths: (B,) response tokens (EOS included); required with a short-response penalty.
        min_response_tokens: responses shorter than this are penalised; None or 0 disables it.
        short_response_penalty: amount subtracted from the scores of such responses; None disables it.

    Returns:
        (B,) processed scores, a new tensor.

    Raises:
        ValueError: if a penalty is given without `contains_eos`.
    """
    scores = scores - score_bias
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    if missing_eos_penalty is not None:
        if contains_eos is None:
            raise ValueError("missing_eos_penalty needs contains_eos")
        scores = scores - missing_eos_penalty * (~contains_eos.bool()).to(scores.dtype)
    if min_response_tokens and short_response_penalty:
        if response_lengths is None:
            raise ValueError("short_response_penalty needs response_lengths")
        scores = scores - short_response_penalty * (response_lengths < min_response_tokens).to(scores.dtype)
    return scores


@torch.no_grad()
def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str | KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token reward r_t = -β·kl_t, plus the score on the last valid token (docs/ppo.md §2.4, §4 item 5).

    The score goes on token L, the first EOS or T-1 without one (TRL-old, OpenRLHF), not on the slot after
    it as TRL-new does.

    Args:
        scores: (B,) processed reward-model scores.
        logprobs: (B, T) rollout log π(y_t).
        ref_logprobs: (B, T) log π_ref(y_t).
        mask: (B, T) valid-token mask, a prefix of ones with at least one valid token per row.
        kl_coef: β.
        estimator: see `approx_kl`.

    Returns:
        (rewards, kl), each (B, T) and zero outside the mask.
    """
    valid = mask.bool()
    kl = approx_kl(logprobs, ref_logprobs, estimator)
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    rewards = -kl_coef * kl
    last = (sequence_lengths(valid) - 1).clamp(min=0)  # (B,) index L of the last valid token
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


@torch.no_grad()
def whiten_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Scale rewards to unit variance, keeping their mean (optional; off by default in TRL, docs/ppo.md §2.5).

    Args:
        rewards: (B, T) per-token rewards.
        mask: (B, T) valid-token mask.

    Returns:
        (B, T) whitened rewards, zero outside the mask.
    """
    whitened = masked_whiten(rewards, mask, shift_mean=False)
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
