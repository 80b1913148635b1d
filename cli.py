"""Command line of alpaca-rlhf.

    python cli.py fit --config configs/tiny/sft.yaml        # any stage: fit / validate / test (LightningCLI)
    python cli.py merge --adapter_path output/tiny/lora-alpaca
    python cli.py generate --mode ppo --ppo_model_path output/tiny/ppo_checkpoints --instruction "Hi"
    python cli.py compare --config configs/tiny/compare.yaml        # base vs SFT vs RLHF, with reward scores
    python cli.py pipeline --config configs/tiny/pipeline.yaml      # SFT, merge, RM, merge, PPO, compare
"""

from __future__ import annotations

import sys

EXTRA_COMMANDS = {
    "merge": "fold a LoRA adapter into its base and save a standalone checkpoint",
    "generate": "answer instructions with a base, SFT or PPO model (--mode base|sft|ppo)",
    "compare": "base vs SFT vs RLHF on held-out instructions: table, report.md, outputs.jsonl, reward scores",
    "pipeline": "run SFT -> merge -> RM -> merge -> PPO -> compare from one YAML, skipping finished stages",
}


def _merge(args: list[str]) -> None:
    from jsonargparse import CLI

    from alpaca_rlhf.models import merge_adapter

    out = CLI(merge_adapter, args=args, as_positional=False)
    print(f"merged checkpoint written to {out}")


def _bare_flags(function, args: list[str]) -> list[str]:
    """`--force` -> `--force=true` for the function's bool parameters (jsonargparse wants a value)."""
    import inspect

    parameters = inspect.signature(function).parameters.items()
    flags = {f"--{name}" for name, p in parameters if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(args):
        value_follows = i + 1 < len(args) and args[i + 1].lower() in ("true", "false")
        out.append(f"{arg}=true" if arg in flags and not value_follows else arg)
    return out


def _function_command(name: str, args: list[str]):
    from jsonargparse import CLI

    if name == "generate":
        from alpaca_rlhf.inference import generate as function
    elif name == "compare":
        from alpaca_rlhf.inference import compare as function
    else:
        from alpaca_rlhf.pipeline import pipeline as function
    return CLI(function, args=_bare_flags(function, args), as_positional=False)


def cli_main(args: list[str] | None = None):
    """Runs one command; `args` defaults to `sys.argv[1:]` (tests pass a list)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
    if argv and argv[0] in ("generate", "compare", "pipeline"):
        return _function_command(argv[0], argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print("extra commands:\n" + "\n".join(f"  {k:10s} {v}" for k, v in EXTRA_COMMANDS.items()) + "\n")

    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the modules take `optimizer`/`scheduler` callables from YAML
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    cli_main()
