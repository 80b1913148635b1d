"""LightningModules of the three training stages."""

from alpaca_rlhf.modules.ppo import PPOModule
from alpaca_rlhf.modules.reward import RewardModule
from alpaca_rlhf.modules.sft import SFTModule

__all__ = ["PPOModule", "RewardModule", "SFTModule"]
