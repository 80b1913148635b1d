"""LightningModules of the training stages."""

from alpaca_rlhf.modules.dpo import DPOModule
from alpaca_rlhf.modules.grpo import GRPOModule
from alpaca_rlhf.modules.ppo import PPOModule
from alpaca_rlhf.modules.reward import RewardModule
from alpaca_rlhf.modules.rloo import RLOOModule
from alpaca_rlhf.modules.sft import SFTModule

__all__ = ["DPOModule", "GRPOModule", "PPOModule", "RLOOModule", "RewardModule", "SFTModule"]
