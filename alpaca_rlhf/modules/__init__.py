"""LightningModules of the training stages."""

from alpaca_rlhf.modules.dpo import DPOModule
from alpaca_rlhf.modules.ppo import PPOModule
from alpaca_rlhf.modules.reward import RewardModule
from alpaca_rlhf.modules.sft import SFTModule

__all__ = ["DPOModule", "PPOModule", "RewardModule", "SFTModule"]
