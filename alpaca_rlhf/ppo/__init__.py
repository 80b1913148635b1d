"""PPO math in plain torch: no Lightning, transformers or PEFT imports (tests/ppo/test_ppo_imports.py keeps it so)."""

from alpaca_rlhf.ppo.advantages import (
    explained_variance,
    gae,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from alpaca_rlhf.ppo.critic_free import (
    LOSS_TYPES,
    clipped_surrogate,
    grpo_advantages,
    k3_kl,
    reduce_loss,
    rloo_advantages,
)
from alpaca_rlhf.ppo.kl import AdaptiveKLController, FixedKLController, KLController
from alpaca_rlhf.ppo.logprobs import (
    EosIds,
    contains_eos,
    entropy_from_logits,
    first_eos_mask,
    logprobs_and_entropy,
    response_logits_slice,
    response_logprobs,
    response_positions,
    sequence_lengths,
)
from alpaca_rlhf.ppo.losses import policy_loss, value_loss
from alpaca_rlhf.ppo.rewards import (
    KL_ESTIMATORS,
    KLEstimator,
    approx_kl,
    kl_penalized_rewards,
    process_scores,
    whiten_rewards,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "AdaptiveKLController",
    "EosIds",
    "FixedKLController",
    "KLController",
    "KLEstimator",
    "approx_kl",
    "clipped_surrogate",
    "contains_eos",
    "entropy_from_logits",
    "explained_variance",
    "first_eos_mask",
    "gae",
    "grpo_advantages",
    "k3_kl",
    "kl_penalized_rewards",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "process_scores",
    "reduce_loss",
    "response_logits_slice",
    "rloo_advantages",
    "response_logprobs",
    "response_positions",
    "sequence_lengths",
    "value_loss",
    "whiten_rewards",
]
