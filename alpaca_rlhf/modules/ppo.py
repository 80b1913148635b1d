"""PPO for RLHF under Lightning's manual optimisation: one prompt batch is one PPO iteration.

The math lives in `alpaca_rlhf.ppo` (pure torch); the rollout, the epoch/minibatch loop, logging, checkpoints and
exports are the online stages' shared parts (`modules/online.py`). What is PPO's own is here: the value model,
KL-penalised per-token rewards, GAE and whitening, the clipped policy + value losses, early stopping on the
policy KL and the KL controller. Conventions follow docs/ppo.md §4.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.modules.online import (  # noqa: F401  (GenerationHParams, is_checkpointing: their old home)
    GenerationHParams,
    OnlineRLModule,
    RolloutHParams,
    Samples,
    is_checkpointing,
)
from alpaca_rlhf.modules.policy import ValueHead
from alpaca_rlhf.ppo.rollout import Rollout


@dataclass
class PPOHParams(RolloutHParams):
    """PPO settings (defaults: TRL's classic PPOConfig, as the seed used; see docs/ppo.md §2.14).

    Attributes:
        ppo_epochs: Optimisation epochs over each rollout batch.
        mini_batch_size: Rollouts per optimizer step; None = the whole batch (one step per epoch).
        gradient_accumulation_steps: Micro-batches per minibatch (memory: forward/backward this many at a time).
        clip_range: PPO ratio clip epsilon.
        value_clip_range: Value clip around the rollout values; None disables value clipping.
        vf_coef: Weight of the value loss (0.1 with a shared trunk).
        gamma: Discount.
        lam: GAE lambda.
        whiten_rewards: Divide per-token rewards by their std over valid tokens (mean kept).
        kl_estimator: Per-token KL penalty estimator: k1, k2, k3, abs, or a dotted path to a function
            `(logprobs, ref_logprobs) -> Tensor`.
        score_clip: Clip processed scores to +-score_clip; None = no clipping.
        missing_eos_penalty: Subtracted from the score of a response that never emitted EOS (TRL); None = off.
        early_stopping: Stop an iteration's remaining epochs once the policy KL passes 1.5 x target_kl.
        target_kl: KL (old -> new, per token) for early stopping.
        max_grad_norm: Gradient clipping by global norm; None = off.
        forward_batch_size: Rollouts per no-grad forward pass during the rollout (memory).
        reuse_rollout_forward: When one micro-batch is the whole batch (mini_batch_size None or >= batch,
            no accumulation), run the rollout's policy forward with autograd and let the first optimizer step
            use it instead of repeating it: the same numbers, one forward less per iteration.
        negative_kl_warning: Warn when the rollout KL (per sequence) falls below this (biased sampling).
        ratio_threshold: Skip (zero the loss of) a micro-batch whose mean ratio pi/pi_old exceeds this, as TRL's
            classic PPO did (`ratio_threshold`: loss spikes); counted in `ppo/ratio_skipped`. None = off.
        max_nonfinite_skips: A NaN/inf score, reward, advantage, loss or gradient skips that update (no weight
            changes, `ppo/skipped_nonfinite` counts it, a warning names the tensor and iteration); this many
            consecutive skipped iterations stop the run with an error.
    """

    ppo_epochs: int = 4
    clip_range: float = 0.2
    value_clip_range: float | None = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    kl_estimator: str = "k1"  # k1, k2, k3, abs, or a dotted path to your own estimator (so not a Literal)
    early_stopping: bool = False
    target_kl: float = 1.0


def resolve_estimator(name: str):
    if name in rl.KL_ESTIMATORS:
        return name
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"kl_estimator must be one of {sorted(rl.KL_ESTIMATORS)} or a dotted path, got {name!r}")
    return getattr(importlib.import_module(module), attr)


class PPOModule(OnlineRLModule):
    """PPO on a merged SFT model with a fresh LoRA adapter and a value head; the reward comes from `scorer`.

    Args:
        ppo: PPO hyperparameters.
        value_head: Builds the value model from the trunk's hidden size (`ValueHead`, or your class_path).
        kl_controller: KL coefficient controller; None = adaptive (init 0.2, target 6, horizon 10000).
        **kwargs: Everything every online stage takes (policy, scorer, lora, generation, ref_model, optimizer,
            scheduler, output_dir, save_freq, ...): see `OnlineRLModule`.
    """

    ALGORITHM = "ppo"
    PROGRESS_BAR = {**OnlineRLModule.PROGRESS_BAR, "ppo/kl_coef": "beta"}  # the KL coefficient beside the KL

    def __init__(self, ppo: PPOHParams = PPOHParams(), value_head: Callable[[int], nn.Module] = ValueHead,
                 kl_controller: rl.KLController | None = None, **kwargs) -> None:
        super().__init__(hparams=ppo, value_head=value_head, samples_per_prompt=1, **kwargs)
        self.save_hyperparameters(ignore=["scorer", "value_head", "kl_controller"])
        self.estimator = resolve_estimator(ppo.kl_estimator)
        self.kl_ctl = kl_controller or rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)

    # ---- experience: KL-penalised rewards, GAE, whitening -----------------------------------------------------
    def build_rollout(self, s: Samples) -> Rollout:
        rewards, kl = rl.kl_penalized_rewards(s.scores, s.logprobs, s.ref_logprobs, s.response_mask,
                                             self.kl_ctl.value, self.estimator)
        if self.hp.whiten_rewards:
            rewards = rl.whiten_rewards(rewards, s.response_mask)
        advantages, returns = rl.gae(s.values, rewards, s.response_mask, self.hp.gamma, self.hp.lam)
        advantages = rl.masked_whiten(advantages, s.response_mask)
        return Rollout(s.query_responses, s.attention_mask, s.response_mask, s.logprobs, s.ref_logprobs, s.values,
                       s.scores, rewards, kl, advantages, returns)

    # ---- loss: clipped policy + value (docs/ppo.md §2.8-2.10), a token mean over the minibatch -----------------------
    def epochs(self) -> int:
        return self.hp.ppo_epochs

    def ppo_losses(self, mb: Rollout, outputs: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict]:
        """Clipped policy + value loss of a micro-batch; `outputs` = the policy's (logits, values) if already run."""
        C = mb.context_length
        logits, values = outputs if outputs is not None else self.policy(mb.query_responses, mb.attention_mask, C)
        logprobs, entropy = rl.logprobs_and_entropy(logits, mb.query_responses[:, C:], self.gen.temperature)
        pg_loss, pg_stats = rl.policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, self.hp.clip_range)
        vf_loss, vf_stats = rl.value_loss(values, mb.values, mb.returns, mb.response_mask, self.hp.value_clip_range)
        entropy = rl.masked_mean(entropy, mb.response_mask)
        stats = {"ppo/policy_loss": pg_loss.detach(), "ppo/value_loss": vf_loss.detach(), "ppo/entropy": entropy,
                 **{f"ppo/{k}": v for k, v in {**pg_stats, **vf_stats}.items()}}
        return pg_loss + self.hp.vf_coef * vf_loss, stats

    micro_loss = ppo_losses

    def stop_after_epoch(self, minibatch_kl) -> bool:
        # TRL-old: early stop on the last minibatch's KL(old || new), decided alike on every rank (a rank that
        # stopped alone would leave the others waiting in their next collective)
        return self.hp.early_stopping and self.stop_early(minibatch_kl)

    def stop_early(self, minibatch_kl) -> bool:
        """Whether to stop this iteration's epochs: the minibatch's KL(old || new), all-reduced so every rank
        decides alike, above 1.5 x target_kl."""
        kl = self.trainer.strategy.reduce(torch.as_tensor(minibatch_kl, device=self.device), reduce_op="mean")
        return float(kl) > 1.5 * self.hp.target_kl

    # ---- the KL controller ----------------------------------------------------------------------------------
    def iteration_stats(self, rollout: Rollout, samples: Samples) -> dict:
        mask = rollout.response_mask
        return {"rollout/non_score_reward": (-self.kl_ctl.value * rollout.kl).sum(1).mean(),
                "ppo/kl_coef": self.kl_ctl.value,
                "ppo/explained_variance": rl.explained_variance(rollout.values, rollout.returns, mask)}

    def end_iteration(self, kl_per_seq: float, episodes: int) -> None:
        self.kl_ctl.update(kl_per_seq, episodes)  # after the optimisation; n = episodes (docs/ppo.md §2.12)

    def state(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state(self, state: dict) -> None:
        if "kl_controller" in state:
            self.kl_ctl.load_state_dict(state["kl_controller"])

    def export_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value}
