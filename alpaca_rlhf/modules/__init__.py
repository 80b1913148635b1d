"""LightningModules of the three training stages."""

from alpaca_rlhf.modules.reward import RewardModule
from alpaca_rlhf.modules.sft import SFTModule

__all__ = ["RewardModule", "SFTModule"]
