"""Command line of alpaca-rlhf: `alpaca-rlhf ...`, `python -m alpaca_rlhf ...`, or `python cli.py ...` in a checkout.

    alpaca-rlhf fit --config configs/tiny/sft.yaml          # train a stage (LightningCLI); validate the same way
    alpaca-rlhf merge --adapter_path output/tiny/lora-alpaca
    alpaca-rlhf generate --model output/tiny/ppo_checkpoints --instruction "Hi"     # or --chat
    alpaca-rlhf compare --config configs/tiny/compare.yaml  # base vs SFT vs RLHF, with reward scores
    alpaca-rlhf pipeline --config tiny/pipeline             # SFT, merge, RM, merge, PPO, compare

One root: `alpaca-rlhf --help` lists every command without importing torch or Lightning; every command takes
`-c/--config` (YAML, stackable) and `--print_config`; a packaged config is found by name from any directory.
"""

from __future__ import annotations

import sys
from typing import Literal

COMMANDS = {
    "fit": "train a stage from its YAML: SFT, reward model, PPO, RLOO, GRPO or DPO (--ckpt_path last resumes)",
    "validate": "run a stage's validation on a checkpoint (LightningCLI)",
    "merge": "fold a LoRA adapter into its base and save a standalone checkpoint",
    "generate": "answer instructions with any stage's model (--model PATH, its kind detected); --chat to talk",
    "compare": "base vs SFT vs RLHF on held-out prompts: scores, judge, KL, diagnostics, report.md and plots",
    "judge": "validate a pairwise LLM judge: its agreement with human labels on held-out pairs, per subset",
    "pipeline": "run SFT -> merge -> RM -> merge -> PPO (or RLOO/GRPO/DPO) -> compare from one YAML, resumable",
    "push": "an adapter or merged folder to the Hugging Face Hub (or a local folder), with a model card",
    "data": "preview what a stage's data feeds the model: counts and rendered examples (-c CONFIG --show N)",
    "preflight": "estimate a stage's peak GPU memory from its config, per component (-c CONFIG [--budget_gb N])",
    "init": "copy the packaged configs into ./configs to edit",
    "env": "versions, CPU bf16 support and CUDA, for bug reports (also: alpaca-rlhf --version)",
}
FIT_COMMANDS = ("fit", "validate")  # = parsers.FIT_COMMANDS, repeated so that `--help` imports no parser
PARSER_NAMES = ("function_parser", "lightning_cli", "parse_fit_config", "abbreviated_options", "_cli_class",
                "_trainer_class")


def __getattr__(name: str):
    """The parsers' names, from `alpaca_rlhf.parsers` on first use (their old home was here)."""
    if name in PARSER_NAMES:
        from alpaca_rlhf import parsers

        return getattr(parsers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alpaca-rlhf")
    except PackageNotFoundError:  # a bare checkout, not installed
        return "unknown (not installed)"


def environment_report() -> str:
    """What a bug report needs: versions of the stack, Python, the CPU's bf16 support, CUDA and its devices."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    lines = [f"alpaca-rlhf {package_version()}", f"python {platform.python_version()} ({platform.platform()})"]
    for dist in ("torch", "lightning", "transformers", "peft", "bitsandbytes", "datasets", "torchmetrics",
                 "jsonargparse", "tensorboard", "gguf"):
        try:
            lines.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            lines.append(f"{dist} (not installed)")
    import torch

    from alpaca_rlhf.hardware import cpu_has_native_bf16, resolve_precision

    lines.append(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                 f"ATen kernels {torch.backends.cpu.get_cpu_capability()}, native bf16: "
                 f"{'yes' if cpu_has_native_bf16() else 'no (bf16 is emulated: use fp32)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")
    else:
        built = f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch"
        lines.append(f"cuda: none ({built})")
    lines.append(f"precision auto -> {resolve_precision('auto', 'auto')[0]}")
    return "\n".join(lines)


def root_help() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: alpaca-rlhf <command> [-c CONFIG] [--print_config] [options]", "",
             "The Alpaca RLHF recipe (SFT, reward model, PPO; or RLOO, GRPO, DPO) with LoRA adapters, on Lightning.",
             "Stage configs: configs/<tiny|smol>/{sft,rm,ppo,rloo,grpo,dpo}.yaml, e.g. `alpaca-rlhf fit -c tiny/grpo`.",
             "", "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`alpaca-rlhf <command> --help` shows a command's options. Packaged configs by name: "
              "`-c tiny/sft`, `-c configs/smol/pipeline.yaml`;", "`alpaca-rlhf init` copies them to edit. "
              "ALPACA_RLHF_DEBUG=1 shows tracebacks of data/config errors."]
    return "\n".join(lines)


def command_function(name: str):
    """The function a function command runs."""
    if name == "init":
        from alpaca_rlhf.packaged import init as function
    elif name == "merge":
        function = merge
    elif name == "generate":
        from alpaca_rlhf.inference.generation import generate as function
    elif name == "compare":
        from alpaca_rlhf.inference.comparison import compare as function
    elif name == "judge":
        from alpaca_rlhf.inference.judge import judge as function
    elif name == "push":
        from alpaca_rlhf.hub import push as function
    else:
        from alpaca_rlhf.pipeline import pipeline as function
    return function


def merge(adapter_path: str, output_dir: str | None = None,
          dtype: Literal["float32", "bfloat16", "float16"] = "float32", base_model: str | None = None,
          overwrite: bool = False):
    """Folds a LoRA adapter into its base and saves a standalone checkpoint plain `transformers` loads.

    The base is loaded unquantized in `dtype`. A sequence-classification adapter (the reward model's) keeps its
    trained `score` head; a model with tied embeddings whose adapter touches the output layer is untied first.
    Tokenizer, template and any JSON side files of the adapter folder are copied along. Written whole or not
    at all.

    Args:
        adapter_path: Folder with `adapter_config.json` and `adapter_model.safetensors`.
        output_dir: Where to write; defaults to `<adapter_path>-adapter-merged`.
        dtype: Weight dtype of the merged checkpoint (never quantized: merging into quantized weights loses
            precision).
        base_model: Override the adapter's recorded base (hub id or folder).
        overwrite: Replace an existing merged folder (later stages may have been trained on it).
    """
    from pathlib import Path

    from alpaca_rlhf.exports import merged_folder
    from alpaca_rlhf.models import merge_adapter  # torch and transformers load here, not for --help

    adapter = Path(adapter_path)
    target = Path(output_dir) if output_dir else Path(merged_folder(adapter))
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"merge: {target} already exists (later stages may have been trained on it); "
                              "pass --overwrite to replace it, or --output_dir to write elsewhere")
    return merge_adapter(adapter_path, output_dir, dtype, base_model)


def parse_function_config(name: str, args: list[str], instantiate: bool = False):
    """The arguments `alpaca-rlhf <name> <args>` (compare, generate, pipeline, ...) would run with, from that
    command's own parser; with `instantiate`, dataclass arguments come back as objects."""
    from alpaca_rlhf.parsers import parse_function_args

    return parse_function_args(command_function(name), name, args, instantiate)


def _function_command(name: str, args: list[str]):
    from alpaca_rlhf.parsers import _bare_flags, function_parser

    function = command_function(name)
    parser = function_parser(function, name, exit_on_error=False)
    config = parser.parse_args(_bare_flags(function, args))
    init = parser.instantiate_classes(config)
    kwargs = {k: v for k, v in vars(init).items() if k != "config"}
    result = function(**kwargs)
    if name == "merge":
        print(f"merged checkpoint written to {result}")
    return result


def cli_main(args: list[str] | None = None):
    """Runs one command; `args` defaults to `sys.argv[1:]` (tests pass a list)."""
    from alpaca_rlhf.packaged import resolve_config_args

    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:  # an unknown command is named as such below, before its --config
        argv = resolve_config_args(argv)  # packaged configs by name
    if not argv or argv[0] in ("-h", "--help"):
        print(root_help())
        return None
    if argv[0] in ("--version", "-V"):
        print(f"alpaca-rlhf {package_version()}")
        return None
    if argv[0] == "env":
        print(environment_report())
        return None
    if argv[0] == "preflight":
        return _preflight(argv[1:])
    if argv[0] == "data":
        from alpaca_rlhf.preview import preview

        return preview(argv[1:])
    if argv[0] in COMMANDS and argv[0] not in FIT_COMMANDS:
        return _function_command(argv[0], argv[1:])
    if argv[0] not in FIT_COMMANDS:
        raise SystemExit(f"alpaca-rlhf: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)} "
                         "(alpaca-rlhf --help)")
    if argv[1:] in (["-h"], ["--help"]):
        from alpaca_rlhf.helptext import cached_help, live

        return cached_help(argv, lambda: print(live(argv[0]), end="") or sys.exit(0))
    from alpaca_rlhf.parsers import lightning_cli

    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
        return lightning_cli(None)
    return lightning_cli(argv)


PREFLIGHT_HELP = """usage: alpaca-rlhf preflight -c CONFIG [--budget_gb N] [--model_shape NAME] [fit overrides]

Estimates the peak accelerator memory of one optimizer step of a stage from its config alone (nothing is
loaded): weights by dtype and quantization, LoRA and value head, gradients and optimizer state, activations
with and without gradient checkpointing, the generation KV cache, and the logits at the kept positions.

  -c, --config CONFIG   the stage's YAML, as `fit` takes it (stackable; packaged names work)
  --budget_gb N         compare with N GiB (default: this machine's GPU, if any)
  --model_shape NAME    the model an earlier stage's output (not written yet) will have the shape of
  fit overrides         any `fit` argument, e.g. --data.init_args.batch_size 8

`fit` runs the same estimate before training and refuses when it is clearly over the GPU's memory
(--preflight warn|off, --preflight_budget_gb N)."""


def _preflight(args: list[str]):
    if not args or args[0] in ("-h", "--help"):
        print(PREFLIGHT_HELP)
        return None
    from alpaca_rlhf.parsers import parse_fit_config
    from alpaca_rlhf.preflight import device_budget_gb, estimate

    options = {"--budget_gb": None, "--model_shape": None}
    for flag in options:
        if flag in args:
            i = args.index(flag)
            options[flag] = args[i + 1]
            args = args[:i] + args[i + 2:]
    budget = float(options["--budget_gb"]) if options["--budget_gb"] else None
    est = estimate(parse_fit_config(args), options["--model_shape"])
    print(est.table(budget or device_budget_gb()))
    return est


DEBUG_ENV = "ALPACA_RLHF_DEBUG"


def main(args: list[str] | None = None) -> None:
    """The command line's entry point: a data or config error prints its one message and exits 1 (set
    ALPACA_RLHF_DEBUG=1 to see the traceback); unexpected errors keep their traceback."""
    import argparse
    import os

    from alpaca_rlhf.errors import USER_ERRORS

    configure_logging()
    try:
        cli_main(args)
    except argparse.ArgumentError as e:  # one line with the fix, no usage dump
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        argv = list(sys.argv[1:] if args is None else args)
        print(f"alpaca-rlhf: error: {argument_error_line(e, argv[0] if argv else '')}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        user_error = _user_error(e, USER_ERRORS)
        if user_error is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"alpaca-rlhf: error: {user_error}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def argument_error_line(error: BaseException, command: str) -> str:
    """A command-line error in one line: jsonargparse's message (its first line, and the value it was given),
    the closest valid option to an unknown one, and what to run instead of a bare `fit`."""
    import difflib
    import re

    text = str(error).strip()
    if "required: fit.data, fit.model" in text or "required: validate.data, validate.model" in text:
        return (f"{command} needs a stage's config, e.g. alpaca-rlhf {command} -c tiny/sft (packaged configs: "
                "alpaca-rlhf init copies them; alpaca-rlhf fit -c tiny/sft --print_config shows every field)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text
    given = next((line for line in lines if line.startswith("Given value:")), None)
    choices = ", ".join(dict.fromkeys(c.strip() for group in re.findall(r"Literal\[(.*?)\]", text)
                                      for c in group.split(",")))
    nested = re.search(r"NestedArg\(key='([\w.]+)', val='(.*?)'\)", text)
    group = re.match(r'Parser key "(model|data)"', first)
    if nested and group:  # an option of the chosen class that it does not have
        option = f"--{group.group(1)}.init_args.{nested.group(1)}"
        close = difflib.get_close_matches(nested.group(1), class_option_names(group.group(1)), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'--{group.group(1)}.init_args.{c}' for c in close)}? " if close else ""
        return (f"{option} is not an option of the {group.group(1)} class; {hint}"
                f"(alpaca-rlhf {command} -c CONFIG --{group.group(1)}.help CLASS lists them)")
    line = first.rstrip(":")
    key = re.match(r'Parser key "([\w.]+)"', line)
    if key and given:  # jsonargparse names the key and the value on lines of their own
        line, given = f"--{key.group(1)} {given.split(':', 1)[1].strip()} is not valid", None
    if choices:
        line += f" (choose one of {choices})"
    if given and given not in line:
        line += f"; {given.lower()}"
    unknown = re.findall(r"--[\w.]+", first) if "unrecognized arguments" in first else []
    if unknown:
        known = option_names(command)
        hints = [f"did you mean {' or '.join(close)}?" for u in unknown
                 if (close := difflib.get_close_matches(u, known, n=2, cutoff=0.75))]
        line += ("; " + " ".join(hints)) if hints else ""
    return f"{line} (alpaca-rlhf {command} --help)" if command else line


def class_option_names(group: str) -> list[str]:
    """The init options of every stage's LightningModule (`group` model) or DataModule (data), with the fields of
    their dataclass options (`lora.r`, `model.dtype`, `ppo.ppo_epochs`), for "did you mean"."""
    import dataclasses
    import inspect
    import typing

    import lightning as L

    from alpaca_rlhf import data, modules

    package, base = (modules, L.LightningModule) if group == "model" else (data, L.LightningDataModule)
    names = set()
    classes = [getattr(package, name) for name in getattr(package, "__all__", dir(package))]  # lazy names too
    # a subclass passing **kwargs on takes its bases' arguments too
    classes = {k for cls in classes if inspect.isclass(cls) for k in cls.__mro__}
    for cls in classes:
        if not issubclass(cls, base) or cls is base or cls.__module__.startswith("lightning"):
            continue
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # an annotation that does not resolve: the names alone
            hints = {}
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            names.add(name)
            kinds = typing.get_args(hints.get(name)) or (hints.get(name),)
            for kind in kinds:
                if dataclasses.is_dataclass(kind):
                    names.update(f"{name}.{f.name}" for f in dataclasses.fields(kind))
    return sorted(names)


def option_names(command: str) -> list[str]:
    """The options `alpaca-rlhf <command>` takes (fit/validate: from its help text)."""
    import re

    if command in (*FIT_COMMANDS, "preflight", "data"):  # the last two take fit's options after their own
        from alpaca_rlhf.helptext import live, shipped

        command = command if command in FIT_COMMANDS else "fit"
        return sorted(set(re.findall(r"--[\w.]+", shipped(command) or live(command))))
    if command in COMMANDS and command not in ("preflight", "data", "env"):
        from alpaca_rlhf.parsers import function_parser

        parser = function_parser(command_function(command), command, exit_on_error=False)
        return sorted({o for action in parser._actions for o in action.option_strings if o.startswith("--")})
    return []


def configure_logging() -> None:
    """alpaca_rlhf's own log lines (what merge, compare and generate are doing) on stderr, at INFO
    (`ALPACA_RLHF_LOG_LEVEL` changes it); Lightning and transformers keep their own logging."""
    import logging
    import os

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever `sys.stderr` is when a line is logged, not the stream it was made with: `main()`
        called again in one process (a notebook, a test) after stderr was swapped must not log to a closed one."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("alpaca_rlhf")
    if logger.handlers:
        return
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("ALPACA_RLHF_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


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


if __name__ == "__main__":
    cli_main()
