"""The parsers behind the command line: a function command's (its function's signature is the command's options),
LightningCLI's for fit and validate (`RLHFCLI`), and the config readers that the pipeline and the data preview use
to read a stage's config exactly as its command would.

`cli.py` (the command table) imports this module only when a command runs, so `alpaca-rlhf --help` loads none
of it; Lightning is imported inside the functions that build a LightningCLI, so a function command's `--help`
stays fast too.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import warnings
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

FIT_COMMANDS = ("fit", "validate")
BASE_KEY = "_base_"
"""A fit config's key naming the YAML file(s) it stacks on, relative to its own folder (mmengine's name)."""


def stacked_yaml(content: str, file: Path) -> str:
    """`content` of the config `file` over the file(s) its `_base_` key names, merged key by key: a mapping
    merges into the base's, anything else (a list of callbacks, a number) replaces it. A base may have a base of
    its own. Content without `_base_` comes back as it is."""
    data = yaml.safe_load(content)
    if not isinstance(data, dict) or BASE_KEY not in data:
        return content
    return yaml.safe_dump(_stacked(data, file, ()), sort_keys=False)


def _stacked(data: dict, file: Path, seen: tuple[Path, ...]) -> dict:
    from alpaca_rlhf.errors import ConfigError

    bases = data.pop(BASE_KEY, None)
    merged: dict = {}
    for name in [bases] if isinstance(bases, str) else bases or []:
        base = (file.parent / str(name)).resolve()
        if base in seen or base == file.resolve():
            raise ConfigError(f"{file}: {BASE_KEY} {name!r} stacks the file on itself")
        if not base.is_file():
            raise ConfigError(f"{file}: {BASE_KEY} names {name!r}, but {base} is not a file (a base is found "
                              "relative to the config that names it)")
        loaded = yaml.safe_load(base.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{base} (the {BASE_KEY} of {file}) is not a mapping of options")
        merged = _merge(merged, _stacked(loaded, base, (*seen, file.resolve())))
    return _merge(merged, data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)


def _bare_flags(function, args: list[str]) -> list[str]:
    """`--force` -> `--force=true` for the function's bool parameters (jsonargparse wants a value)."""
    parameters = inspect.signature(function).parameters.items()
    flags = {f"--{name}" for name, p in parameters if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(args):
        value_follows = i + 1 < len(args) and args[i + 1].lower() in ("true", "false")
        out.append(f"{arg}=true" if arg in flags and not value_follows else arg)
    return out


def function_parser(function, name: str, exit_on_error: bool = True):
    """The parser of a function command `name` running `function`: its signature's arguments, `-c/--config` and
    `--print_config`."""
    summary = inspect.cleandoc(function.__doc__ or "").split("\nArgs:")[0].strip()  # the options carry the rest
    parser = ArgumentParser(prog=f"alpaca-rlhf {name}", description=summary, exit_on_error=exit_on_error,
                            allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file(s) of these options")
    parser.add_function_arguments(function, as_positional=False)
    return parser


def lightning_cli(args: list[str] | None, cli_class=None):
    """The LightningCLI every fit/validate run uses; `cli_class` lets the pipeline parse with the very same one."""
    import lightning as L

    return (cli_class or _cli_class())(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the modules take `optimizer`/`scheduler` callables from YAML
        trainer_class=_trainer_class(),  # Lightning's, with `precision: auto`
        save_config_kwargs={"overwrite": True},
        # `--trainer.max_step` is not silently `max_steps` (as TRL); a bad argument raises (main prints one line
        # with the closest names) instead of a usage dump
        parser_kwargs={"allow_abbrev": False, "exit_on_error": False},
        args=args,
    )


def _trainer_class():
    from alpaca_rlhf.trainer import Trainer

    return Trainer


def one_template(config) -> None:
    """A fit config's data renders prompts with its model's template: a data `template` left out (None) takes the
    model's; one given that differs stops the run (a mismatch trains on one format and exports another)."""
    from alpaca_rlhf.errors import ConfigError

    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args")
    if data is None or "template" not in data or "template" not in model:  # a module or data without templates
        return
    if data["template"] is None:
        data["template"] = model["template"]
    elif data["template"] != model["template"]:
        raise ConfigError(f"data.init_args.template is {data['template']!r} but model.init_args.template is "
                          f"{model['template']!r}: the data must render prompts as the model's exports do. Set "
                          "model.init_args.template only (the data takes it)")


def _parser_class():
    from lightning.pytorch.cli import LightningArgumentParser

    class StackingParser(LightningArgumentParser):
        """Lightning's parser, where a config file may stack on the file(s) its `_base_` key names."""

        def parse_path(self, path, *args, **kwargs):
            token = _config_file.set(Path(path).absolute())  # jsonargparse reads it from inside its folder
            try:
                return super().parse_path(path, *args, **kwargs)  # reads the file, then calls parse_string
            finally:
                _config_file.reset(token)

        def parse_string(self, content, path="", *args, **kwargs):
            file = _config_file.get()
            if file is not None:
                token = _config_file.set(None)  # only the file itself stacks, not the values inside it
                try:
                    return super().parse_string(stacked_yaml(content, file), path, *args, **kwargs)
                finally:
                    _config_file.reset(token)
            return super().parse_string(content, path, *args, **kwargs)

    return StackingParser


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class RLHFCLI(LightningCLI):
        """LightningCLI with the subcommands that have steps here (fit, validate), config files that stack on a
        `_base_`, and trainers that write checkpoints atomically (`alpaca_rlhf.io.use_atomic_checkpoints`)."""

        def init_parser(self, **kwargs):
            self.parser_class = _parser_class()  # config files stack on a `_base_`, however the CLI was built
            return super().init_parser(**kwargs)

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items() if k in FIT_COMMANDS}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--preflight", type=Literal["check", "warn", "off"], default="check",
                                help="Memory preflight before fit: check refuses a config clearly over the GPU's "
                                     "memory, warn only warns, off skips it (alpaca-rlhf preflight --help)")
            parser.add_argument("--preflight_budget_gb", type=float | None, default=None,
                                help="Budget of the preflight in GiB; None = the GPU's memory (none: log only)")
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="Start a new run over one whose checkpoints or adapter exist (its checkpoints "
                                     "are removed); without it such a run stops and says to resume it with "
                                     "--ckpt_path last")

        def parse_arguments(self, parser, args) -> None:
            if args is None:  # the command line itself (LightningCLI warns when given both)
                sys.argv[1:] = renamed_options(sys.argv[1:])
            elif isinstance(args, list | tuple):
                args = renamed_options(list(args))
            super().parse_arguments(parser, args)
            argv = list(args) if isinstance(args, list | tuple) else []
            command = self.config.get("subcommand")
            abbreviated = abbreviated_options(argv, self.config.get(command)) if command in FIT_COMMANDS else []
            if abbreviated:
                from alpaca_rlhf.errors import ConfigError

                given, meant = abbreviated[0]
                raise ConfigError(f"{given} is not an option (abbreviations are refused); did you mean {meant}? "
                                  f"(alpaca-rlhf {command} --help)")

        def before_instantiate_classes(self) -> None:
            """The data takes the model's template; a missing local data file stops the run before any model
            loads (minutes on a real model)."""
            from alpaca_rlhf.data.records import check_data_path

            config = self.config.get(self.subcommand) if self.subcommand else self.config
            one_template(config)
            data_path = ((config or {}).get("data") or {}).get("init_args", {}).get("data_path")
            check_data_path(data_path)

        def before_fit(self) -> None:
            from alpaca_rlhf.io import refuse_to_start_over
            from alpaca_rlhf.preflight import check

            config = self.config["fit"]
            check(config, config.get("preflight", "check"), config.get("preflight_budget_gb"))
            resuming = config.get("ckpt_path") is not None
            self.model.resume_requested = resuming  # an online stage told to resume that finds no checkpoint
            removed = refuse_to_start_over(self.trainer, self.model, resuming, bool(config.get("overwrite")))
            if removed:
                import logging

                logging.getLogger("alpaca_rlhf").info("--overwrite: removed %d checkpoint(s) of the earlier run "
                                                      "in %s", len(removed), removed[0].parent)

        def instantiate_trainer(self, **kwargs):
            from alpaca_rlhf.io import use_atomic_checkpoints

            trainer = super().instantiate_trainer(**kwargs)
            use_atomic_checkpoints(trainer)
            return trainer

    return RLHFCLI


RENAMED_OPTIONS = {"--model.init_args.policy": "--model.init_args.model", "--model.policy": "--model.model"}
"""Old option names -> the ones every stage uses (an online stage's input model was `policy`)."""


def renamed_options(argv: list[str]) -> list[str]:
    """`argv` with old option names (`--model.init_args.policy.name_or_path X`) under their new ones, each with
    a warning, so an old command line still runs."""
    from lightning.pytorch.utilities import rank_zero_warn

    out = []
    for token in argv:
        for old, new in RENAMED_OPTIONS.items():
            if token == old or token.startswith((old + ".", old + "=")):
                rank_zero_warn(f"{old} is now {new} (every stage's input model is `model`): read as {new}")
                token = new + token[len(old):]
                break
        out.append(token)
    return out


def abbreviated_options(argv: list[str], config) -> list[tuple[str, str]]:
    """(given, meant) for each dotted option of `argv` that the parser took as an abbreviation: jsonargparse
    refuses `--trainer.max_step` but completes a nested class field (`--model.init_args.ppo.ppo_epoch` set
    `ppo_epochs`), so the parsed config lacks the given key and holds one that starts with it."""
    found = []
    for token in argv:
        if not token.startswith("--") or "." not in token:
            continue
        key = token[2:].split("=", 1)[0]
        if key.endswith(("+", ".help")):
            continue
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, Namespace) else None
        if not isinstance(node, Namespace) or leaf in vars(node):
            continue
        completed = sorted(k for k in vars(node) if k.startswith(leaf))
        if completed:
            found.append((f"--{key}", f"--{'.'.join([*parents, completed[0]])}"))
    return found


def parse_fit_config(args: list[str]):
    """The config `python cli.py fit <args>` would run with, resolved by its own parser, nothing instantiated.

    The pipeline reads output folders from this, so `--model.output_dir X`, `--model.init_args.output_dir X`
    and a stacked YAML's `model: {output_dir: X}` all mean what they mean to the stage itself.
    """
    class ConfigOnly(_cli_class()):
        def _parse_ckpt_path(self) -> None: ...
        def before_instantiate_classes(self) -> None: ...  # a config is read, not run: its data may be elsewhere
        def _set_seed(self) -> None: ...
        def instantiate_classes(self) -> None: ...
        def after_instantiate_classes(self) -> None: ...
        def _run_subcommand(self, subcommand: str) -> None: ...

    with warnings.catch_warnings():  # "args given while sys.argv also holds arguments": intended here
        warnings.simplefilter("ignore")
        cli = lightning_cli(["fit", *args], ConfigOnly)
    return cli.config["fit"]


def parse_function_args(function, name: str, args: list[str], instantiate: bool = False):
    """The arguments the function command `name` (running `function`: compare, generate, pipeline, ...) would run
    with, from that command's own parser; with `instantiate`, dataclass arguments come back as objects."""
    parser = function_parser(function, name, exit_on_error=False)
    config = parser.parse_args(_bare_flags(function, args))
    return parser.instantiate_classes(config) if instantiate else config
