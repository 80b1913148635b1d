"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics"; TRL's RLOOTrainer),
on the online stages' shared parts. The KL lives in the reward, per sequence (k1):
`r_i = score_i - beta * sum_t (logp_t - ref_logp_t)`, then `A_i = r_i - mean_{j != i} r_j` within the prompt's
group, broadcast to every valid token of the clipped surrogate. No value model, no GAE (docs/algorithms.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.modules.critic_free import CriticFreeHParams, CriticFreeModule
from alpaca_rlhf.modules.sampler import Samples
from alpaca_rlhf.ppo.rollout import Rollout


@dataclass
class RLOOHParams(CriticFreeHParams):
    """RLOO settings (TRL's RLOOConfig names and defaults: num_generations 2, beta 0.05, num_iterations 1,
    epsilon 0.2). Also: the shared `RolloutHParams` (mini_batch_size, gradient_accumulation_steps, max_grad_norm,
    score_clip, missing_eos_penalty, forward_batch_size, ...).

    Attributes:
        num_generations: Completions per prompt (k >= 2; TRL's old `rloo_k`).
        beta: KL coefficient in the reward (sequence-level k1, before the baseline).
        loss_type: Loss reduction (default `bnpo`: a token mean over the minibatch, as PPO here and TRL's old
            RLOOTrainer).
        normalize_advantages: Whiten the advantages over the generation batch (mean 0, std 1; TRL).
    """

    num_generations: int = 2
    normalize_advantages: bool = False


class RLOOModule(CriticFreeModule):
    """RLOO on a merged SFT model with a fresh LoRA adapter; the reward comes from `scorer`.

    Args:
        rloo: RLOO hyperparameters.
        **kwargs: Everything every online stage takes (policy, scorer, lora, generation, ref_model, optimizer,
            scheduler, output_dir, save_freq, ...): see `OnlineRLModule`.
    """

    ALGORITHM = "rloo"

    def __init__(self, rloo: RLOOHParams = RLOOHParams(), **kwargs) -> None:
        super().__init__(rloo, **kwargs)
        self.save_hyperparameters(ignore=["scorer"])

    def build_rollout(self, s: Samples) -> Rollout:
        mask = s.response_mask
        kl = (s.logprobs - s.ref_logprobs) * mask  # k1 per token; its sum over the sequence enters the reward
        rewards = s.scores - self.hp.beta * kl.sum(1)
        advantages = rl.rloo_advantages(rewards, self.k)
        if self.hp.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
        return self.sequence_rollout(s, rewards, kl, advantages)

    def iteration_stats(self, rollout: Rollout, samples: Samples) -> dict:
        return {"rloo/reward": rollout.rewards.mean(), "rloo/reward_std": rollout.rewards.std(),
                # the sequence advantage (each valid token carries it), not its sum over the response's tokens
                "rloo/advantage_std": (rl.masked_mean(rollout.advantages, rollout.response_mask, dim=1).std()
                                       if len(rollout) > 1 else 0.0),
                "rollout/non_score_reward": -self.hp.beta * rollout.kl.sum(1).mean()}
