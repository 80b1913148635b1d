"""REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++", arXiv:2501.03262; OpenRLHF's `reinforce_baseline`): k
completions per prompt, the group's mean score as the baseline, then the advantages whitened over the whole
batch, not per group as GRPO does, so a group whose scores barely differ is not blown up to unit scale. The KL
is k3 per token in the loss, weighted by `beta` (as GRPO). No value model (docs/algorithms.md).

The whole method is this file and one function of the RL math (`reinforce_baseline_advantages`): a new
critic-free method needs no change anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.modules.critic_free import CriticFreeHParams, CriticFreeModule, LossType
from alpaca_rlhf.modules.sampler import Samples
from alpaca_rlhf.ppo.critic_free import reinforce_baseline_advantages
from alpaca_rlhf.ppo.rollout import Rollout


@dataclass
class ReinforceHParams(CriticFreeHParams):
    """REINFORCE++-baseline settings. Also: the shared critic-free and rollout settings (mini_batch_size,
    num_iterations, epsilon, max_grad_norm, missing_eos_penalty, ...).

    Attributes:
        num_generations: Completions per prompt (k >= 2; the baseline is the group's mean).
        beta: Weight of the per-token k3 KL in the loss.
        loss_type: Loss reduction (default `bnpo`: a token mean over the minibatch, which does not favour short
            answers).
    """

    num_generations: int = 4
    beta: float = 0.01
    loss_type: LossType = "bnpo"


class ReinforceModule(CriticFreeModule):
    """REINFORCE++-baseline on a merged SFT model with a fresh LoRA adapter; the reward comes from `scorer`.

    Args:
        reinforce: REINFORCE++-baseline hyperparameters.
        **kwargs: Everything every online stage takes (policy, scorer, lora, generation, ref_model, optimizer,
            scheduler, output_dir, save_freq, ...): see `OnlineRLModule`.
    """

    ALGORITHM = "reinforce"

    def __init__(self, reinforce: ReinforceHParams = ReinforceHParams(), **kwargs) -> None:
        super().__init__(reinforce, **kwargs)
        self.save_hyperparameters(ignore=["scorer"])

    def kl_in_loss_coef(self) -> float:
        return self.hp.beta

    def build_rollout(self, s: Samples) -> Rollout:
        kl = rl.k3_kl(s.logprobs, s.ref_logprobs) * s.response_mask  # what the loss penalises
        return self.sequence_rollout(s, s.scores, kl, reinforce_baseline_advantages(s.scores, self.k))

    def iteration_stats(self, rollout: Rollout, samples: Samples) -> dict:
        return {"reinforce/reward": rollout.rewards.mean(), "reinforce/reward_std": rollout.rewards.std()}
