"""Command line of alpaca-rlhf.

    python cli.py fit --config configs/tiny/sft.yaml        # any stage: fit / validate / test (LightningCLI)
    python cli.py merge --adapter_path output/tiny/lora-alpaca
"""

from __future__ import annotations

import sys

EXTRA_COMMANDS = {
    "merge": "fold a LoRA adapter into its base and save a standalone checkpoint",
}


def _merge(args: list[str]) -> None:
    from jsonargparse import CLI

    from alpaca_rlhf.models import merge_adapter

    out = CLI(merge_adapter, args=args, as_positional=False)
    print(f"merged checkpoint written to {out}")


def cli_main(args: list[str] | None = None):
    """Runs one command; `args` defaults to `sys.argv[1:]` (tests pass a list)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
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
