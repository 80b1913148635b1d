"""alpaca_rlhf: the Alpaca RLHF recipe (SFT -> reward model -> PPO) with LoRA, on Lightning."""

__version__ = "0.1.0"
