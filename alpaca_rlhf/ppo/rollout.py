"""One PPO iteration's experience and the minibatch schedule over it (plain torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One iteration's experience, detached. B completions, C padded prompt length, T response length.

    PPO fills every field. The critic-free methods (RLOO, GRPO) leave `values` and `returns` None, keep
    sequence rewards (B,) in `rewards`, and put the sequence advantage on every valid token of `advantages`.
    """

    query_responses: Tensor  # (B, C+T) left-padded prompt ids, then sampled response ids (pad after EOS)
    attention_mask: Tensor   # (B, C+T) 1 on real prompt tokens and on response tokens through the first EOS
    response_mask: Tensor    # (B, T) bool, 1 through the first EOS, 0 after
    logprobs: Tensor         # (B, T) log pi_old(a_t | s_t), adapter enabled, logits / temperature
    ref_logprobs: Tensor | None  # (B, T) same tokens, reference policy (adapter disabled); None if not needed
    values: Tensor | None    # (B, T) V_old(s_t), zero outside response_mask; None without a value model
    scores: Tensor           # (B,)   processed scorer output (centred, clipped, EOS-penalised)
    rewards: Tensor          # (B, T) PPO: -beta * kl, plus the score on the last valid token; (B,) critic-free
    kl: Tensor               # (B, T) per-token KL estimate, zero outside response_mask
    advantages: Tensor       # (B, T) GAE advantages, whitened over valid tokens
    returns: Tensor | None   # (B, T) advantages (before whitening) + values; None without a value model

    @property
    def context_length(self) -> int:
        return self.query_responses.shape[1] - self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.query_responses.shape[0]

    def select(self, index: Tensor) -> Rollout:
        """The rows `index` of every field."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in fields(self)})


def minibatch_indices(batch_size: int, mini_batch_size: int, generator: torch.Generator | None = None):
    """Shuffled index tensors of `mini_batch_size` covering `batch_size` rows once (the last may be short)."""
    perm = torch.randperm(batch_size, generator=generator)
    return [perm[i : i + mini_batch_size] for i in range(0, batch_size, mini_batch_size)]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counting real tokens only, as `generate` derives them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
