"""Command line of alpaca-rlhf (a shim: the CLI lives in `alpaca_rlhf.cli`).

    python cli.py fit --config configs/tiny/sft.yaml        # any stage: fit / validate (LightningCLI)
    python cli.py merge --adapter_path output/tiny/lora-alpaca
    python cli.py generate --mode ppo --ppo_model_path output/tiny/ppo_checkpoints --instruction "Hi"
    python cli.py compare --config configs/tiny/compare.yaml        # base vs SFT vs RLHF, with reward scores
    python cli.py pipeline --config configs/tiny/pipeline.yaml      # SFT, merge, RM, merge, PPO, compare
"""

from alpaca_rlhf.cli import cli_main, main

__all__ = ["cli_main", "main"]

if __name__ == "__main__":
    main()
