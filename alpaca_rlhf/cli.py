"""Command line of alpaca-rlhf: `alpaca-rlhf ...`, `python -m alpaca_rlhf ...`, or `python cli.py ...` in a checkout.

    python cli.py fit --config configs/tiny/sft.yaml        # any stage: fit / validate / test (LightningCLI)
    python cli.py merge --adapter_path output/tiny/lora-alpaca
    python cli.py generate --mode ppo --ppo_model_path output/tiny/ppo_checkpoints --instruction "Hi"
    python cli.py compare --config configs/tiny/compare.yaml        # base vs SFT vs RLHF, with reward scores
    python cli.py pipeline --config configs/tiny/pipeline.yaml      # SFT, merge, RM, merge, PPO, compare
"""

from __future__ import annotations

import sys
import warnings

EXTRA_COMMANDS = {
    "merge": "fold a LoRA adapter into its base and save a standalone checkpoint",
    "generate": "answer instructions with a base, SFT or PPO model (--mode base|sft|ppo)",
    "compare": "base vs SFT vs RLHF on held-out instructions: table, report.md, outputs.jsonl, reward scores",
    "pipeline": "run SFT -> merge -> RM -> merge -> PPO -> compare from one YAML, skipping finished stages",
    "init": "copy the packaged configs into ./configs to edit (--directory D, --force)",
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


def _function(name: str):
    if name == "init":
        from alpaca_rlhf.packaged import init as function
    elif name == "generate":
        from alpaca_rlhf.inference import generate as function
    elif name == "compare":
        from alpaca_rlhf.inference import compare as function
    else:
        from alpaca_rlhf.pipeline import pipeline as function
    return function


def _function_command(name: str, args: list[str]):
    from jsonargparse import CLI

    function = _function(name)
    return CLI(function, args=_bare_flags(function, args), as_positional=False)


def cli_main(args: list[str] | None = None):
    """Runs one command; `args` defaults to `sys.argv[1:]` (tests pass a list)."""
    from alpaca_rlhf.packaged import resolve_config_args

    argv = resolve_config_args(list(sys.argv[1:] if args is None else args))  # packaged configs by name
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
    if argv and argv[0] in ("generate", "compare", "pipeline", "init"):
        return _function_command(argv[0], argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print("extra commands:\n" + "\n".join(f"  {k:10s} {v}" for k, v in EXTRA_COMMANDS.items()) + "\n")
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
        return lightning_cli(None)
    return lightning_cli(argv)


DEBUG_ENV = "ALPACA_RLHF_DEBUG"


def main(args: list[str] | None = None) -> None:
    """The command line's entry point: a data or config error prints its one message and exits 1 (set
    ALPACA_RLHF_DEBUG=1 to see the traceback); unexpected errors keep their traceback."""
    import os

    from alpaca_rlhf.errors import USER_ERRORS

    try:
        cli_main(args)
    except Exception as e:
        user_error = _user_error(e, USER_ERRORS)
        if user_error is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"alpaca-rlhf: error: {user_error}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _user_error(error: BaseException, kinds: tuple) -> BaseException | None:
    """The user error `error` is, or was raised from: jsonargparse wraps an error raised while it builds a
    nested class (a scorer's missing model folder) in a ValueError of its own, `raise ... from` the cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def lightning_cli(args: list[str] | None, cli_class=None):
    """The LightningCLI every fit/validate run uses; `cli_class` lets the pipeline parse with the very same one."""
    import lightning as L

    return (cli_class or _cli_class())(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the modules take `optimizer`/`scheduler` callables from YAML
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class RLHFCLI(LightningCLI):
        """LightningCLI whose trainers write checkpoints atomically (`alpaca_rlhf.io.use_atomic_checkpoints`)."""

        def instantiate_trainer(self, **kwargs):
            from alpaca_rlhf.io import use_atomic_checkpoints

            trainer = super().instantiate_trainer(**kwargs)
            use_atomic_checkpoints(trainer)
            return trainer

    return RLHFCLI


def parse_fit_config(args: list[str]):
    """The config `python cli.py fit <args>` would run with, resolved by its own parser, nothing instantiated.

    The pipeline reads output folders from this, so `--model.adapter_dir X`, `--model.init_args.adapter_dir X`
    and a stacked YAML's `model: {adapter_dir: X}` all mean what they mean to the stage itself.
    """
    class ConfigOnly(_cli_class()):
        def _parse_ckpt_path(self) -> None: ...
        def _set_seed(self) -> None: ...
        def instantiate_classes(self) -> None: ...
        def after_instantiate_classes(self) -> None: ...
        def _run_subcommand(self, subcommand: str) -> None: ...

    with warnings.catch_warnings():  # "args given while sys.argv also holds arguments": intended here
        warnings.simplefilter("ignore")
        cli = lightning_cli(["fit", *args], ConfigOnly)
    return cli.config["fit"]


def parse_function_config(name: str, args: list[str], instantiate: bool = False):
    """The arguments `python cli.py <name> <args>` (compare, generate, pipeline) would run with, from
    jsonargparse's own parser of that function; with `instantiate`, dataclass arguments come back as objects."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    function = _function(name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(function, as_positional=False)
    config = parser.parse_args(_bare_flags(function, args))
    return parser.instantiate_classes(config) if instantiate else config


if __name__ == "__main__":
    cli_main()
