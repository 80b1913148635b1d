"""What RLOO and GRPO share on top of the online parts: k completions per prompt, no value model, and the
clipped surrogate with a sequence advantage on every valid token, reduced by `loss_type` (docs/algorithms.md).
Argument names are TRL's `RLOOConfig` / `GRPOConfig` ones (num_generations, beta, num_iterations, epsilon,
epsilon_high, loss_type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.modules.online import OnlineRLModule, RolloutHParams
from alpaca_rlhf.ppo.rollout import Rollout

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]


@dataclass
class CriticFreeHParams(RolloutHParams):
    """Settings RLOO and GRPO share (TRL's names).

    Attributes:
        num_generations: Completions sampled per prompt (k >= 2), contiguous rows; a batch of P prompts gives
            P x k completions.
        beta: KL coefficient.
        num_iterations: Optimisation passes over each generation batch (TRL's mu); 1 = one pass, first ratio 1.
        epsilon: Lower clip of the ratio.
        epsilon_high: Upper clip; None = `epsilon` (DAPO suggests 0.28).
        loss_type: Loss reduction over valid tokens: `grpo` (per-sequence token mean, then mean over sequences;
            Shao et al. 2024), `bnpo`/`dapo` (token mean over the minibatch; DAPO), `dr_grpo` (sum / (sequences x
            max_new_tokens); Liu et al. 2025).
    """

    num_generations: int = 4
    beta: float = 0.05
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: LossType = "bnpo"


class CriticFreeModule(OnlineRLModule):
    """An online stage without a value model: groups of k completions, a sequence advantage, the clipped
    surrogate (plus `kl_in_loss_coef()` x k3 per token), reduced by `loss_type`."""

    def __init__(self, hparams: CriticFreeHParams, **kwargs) -> None:
        if hparams.num_generations < 2:
            raise ConfigError(f"{self.ALGORITHM}.num_generations must be >= 2 (a group needs a baseline), got "
                              f"{hparams.num_generations}")
        if hparams.loss_type not in rl.LOSS_TYPES:
            raise ConfigError(f"{self.ALGORITHM}.loss_type must be one of {rl.LOSS_TYPES}, got {hparams.loss_type!r}")
        super().__init__(hparams=hparams, value_head=None, samples_per_prompt=hparams.num_generations, **kwargs)

    def epochs(self) -> int:
        return self.hp.num_iterations

    def kl_in_loss_coef(self) -> float:
        """The weight of the per-token k3 KL in the loss (GRPO's beta; 0 for RLOO, whose KL is in the reward)."""
        return 0.0

    def micro_weight(self, rollout: Rollout, part: Tensor, idx: Tensor) -> Tensor:
        if self.hp.loss_type in ("grpo", "dr_grpo"):  # per-sequence normalisers: the share of sequences
            return torch.tensor(len(part) / len(idx), device=rollout.logprobs.device)
        return super().micro_weight(rollout, part, idx)  # the share of the minibatch's valid tokens

    def micro_loss(self, mb: Rollout, outputs: tuple | None = None) -> tuple[Tensor, dict]:
        C = mb.context_length
        logits = (outputs if outputs is not None else self.policy(mb.query_responses, mb.attention_mask, C,
                                                                  with_values=False))[0]
        logprobs, entropy = rl.logprobs_and_entropy(logits, mb.query_responses[:, C:], self.gen.temperature)
        per_token, st = rl.clipped_surrogate(logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                            self.hp.epsilon, self.hp.epsilon_high)
        a = self.ALGORITHM
        stats = {}
        beta = self.kl_in_loss_coef()
        if beta:
            kl = rl.k3_kl(logprobs, mb.ref_logprobs)
            stats[f"{a}/kl"] = rl.masked_mean(kl.detach(), mb.response_mask)  # TRL's `kl`
            per_token = per_token + beta * kl
        loss = rl.reduce_loss(per_token, mb.response_mask, self.hp.loss_type, self.gen.max_new_tokens)
        entropy = rl.masked_mean(entropy, mb.response_mask)
        stats.update({f"{a}/loss": loss.detach(), f"{a}/entropy": entropy, **{f"{a}/{k}": v for k, v in st.items()}})
        return loss, stats

    def sequence_rollout(self, s, rewards: Tensor, kl: Tensor, advantages: Tensor) -> Rollout:
        """The detached experience: the sequence advantage on every valid token; no values or returns."""
        mask = s.response_mask
        return Rollout(s.query_responses, s.attention_mask, mask, s.logprobs, s.ref_logprobs, None, s.scores,
                       rewards, kl, advantages[:, None] * mask, None)
