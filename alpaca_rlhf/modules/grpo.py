"""GRPO: group-normalised advantages (Shao et al. 2024, DeepSeekMath; TRL's GRPOTrainer) on the online stages'
shared parts. `A_i = (r_i - mean(group)) / (std(group) + 1e-4)` (unbiased std; `scale_rewards: false` drops the
division: Dr. GRPO, Liu et al. 2025). The KL is not in the reward but in the loss, per token, with the k3
estimator weighted by `beta`. No value model (docs/algorithms.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.modules.critic_free import CriticFreeHParams, CriticFreeModule, LossType
from alpaca_rlhf.modules.sampler import Samples
from alpaca_rlhf.ppo.rollout import Rollout


@dataclass
class GRPOHParams(CriticFreeHParams):
    """GRPO settings (TRL's GRPOConfig names). Also: the shared `RolloutHParams` (mini_batch_size,
    gradient_accumulation_steps, max_grad_norm, score_clip, missing_eos_penalty, forward_batch_size, ...).

    Attributes:
        num_generations: Completions per prompt (k >= 2; TRL's default 8).
        beta: Weight of the per-token k3 KL in the loss. 0.04 here (the paper's); TRL's default is now 0.0, which
            skips the reference forward entirely (then `rollout/kl` is not measured: NaN).
        loss_type: Loss reduction (default `dr_grpo`: a token sum over a constant, max_new_tokens, so a token of a
            short answer weighs what a token of a long one does; the paper's `grpo`, a per-sequence mean, gives each
            token of a 10x shorter answer 10x the push; TRL defaults to `dapo`).
        scale_rewards: Divide by the group's std; False = Dr. GRPO.
    """

    num_generations: int = 8
    beta: float = 0.04
    loss_type: LossType = "dr_grpo"
    scale_rewards: bool = True


class GRPOModule(CriticFreeModule):
    """GRPO on a merged SFT model with a fresh LoRA adapter; the reward comes from `scorer`.

    Args:
        grpo: GRPO hyperparameters.
        **kwargs: Everything every online stage takes (policy, scorer, lora, generation, ref_model, optimizer,
            scheduler, output_dir, save_freq, ...): see `OnlineRLModule`.
    """

    ALGORITHM = "grpo"

    def __init__(self, grpo: GRPOHParams = GRPOHParams(), **kwargs) -> None:
        super().__init__(grpo, **kwargs)
        self.save_hyperparameters(ignore=["scorer"])

    def needs_reference(self) -> bool:
        return self.hp.beta != 0.0  # beta 0: no reference forward at all (TRL)

    def kl_in_loss_coef(self) -> float:
        return self.hp.beta

    def build_rollout(self, s: Samples) -> Rollout:
        mask = s.response_mask
        if s.ref_logprobs is not None:
            kl = rl.k3_kl(s.logprobs, s.ref_logprobs) * mask  # what the loss penalises, at the rollout's policy
        else:
            kl = torch.full_like(s.logprobs, math.nan)  # not measured (no reference forward with beta 0)
        advantages, _ = rl.grpo_advantages(s.scores, self.k, self.hp.scale_rewards)
        return self.sequence_rollout(s, s.scores, kl, advantages)

    def iteration_stats(self, rollout: Rollout, samples: Samples) -> dict:
        zero_std = rollout.rewards.view(-1, self.k).std(1) == 0  # groups whose completions all scored alike
        return {"grpo/reward": rollout.rewards.mean(), "grpo/reward_std": rollout.rewards.std(),
                "grpo/frac_reward_zero_std": zero_std.float().mean()}
