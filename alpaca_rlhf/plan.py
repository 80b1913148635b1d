"""The pipeline's plan: its YAML's stages (`Stages`), each stage's config read by that stage's own parser
(`StageConfig`), and the wiring of one stage's output into the next (`plan`). Nothing runs here; `pipeline.py`
runs the plan.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from alpaca_rlhf import exports
from alpaca_rlhf.data.partition import Partition
from alpaca_rlhf.packaged import config_root, find_config

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # the folder that holds alpaca_rlhf/

STAGE_NAMES = ("sft", "merge_sft", "rm", "merge_rm", "rl", "ppo", "rloo", "grpo", "dpo", "judge", "merge_judge",
               "compare")


ONLINE = ("ppo", "rloo", "grpo")  # the bundled online methods (any OnlineRLModule subclass is one: `Stage.online`)


RL_NAMES = ("rl", *ONLINE, "dpo")  # `--from_stage` with any of them reruns the RL stage, whichever it is


@dataclass
class FitStage:
    """A training stage: `python cli.py fit --config <config> ... <overrides>`.

    Attributes:
        config: The stage's YAML, or a list stacked in order (`[configs/ppo.yaml, my_ppo.yaml]`).
        overrides: Extra arguments for this stage, e.g. `["--trainer.max_steps", "60"]`; they follow the
            pipeline's wiring, so they win over it.
    """

    config: str | list[str]
    overrides: list[str] = field(default_factory=list)


@dataclass
class MergeStage:
    """`python cli.py merge` of the previous stage's adapter.

    Attributes:
        dtype: float32, bfloat16 or float16 (the base is loaded unquantized for merging).
        output_dir: Where the merged model goes; None = `<the stage's output_dir>-adapter-merged`.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output_dir: str | None = None


@dataclass
class CompareStage:
    """`python cli.py compare` of base, SFT and RLHF on PPO's held-out prompts, with reward-model scores.

    Attributes:
        config: The compare YAML (sampling, samples per prompt, report_dir); None = compare's defaults.
        overrides: Extra arguments, e.g. `["--samples_per_prompt", "1"]`.
        enabled: False skips the comparison.
    """

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    enabled: bool = True


@dataclass
class Stages:
    """Every stage's config; the defaults are the real (Llama-3.1-8B, GPU) configs.

    The RL stage is `rl` (any algorithm) or `ppo`, or one of `rloo`, `grpo`, `dpo` in its place (give one of
    those four and `ppo` is not run). Its config's module class says which algorithm runs: `DPOModule`, or any
    `OnlineRLModule` subclass (PPO, RLOO, GRPO, REINFORCE++ or one of your own, named by its `ALGORITHM`);
    under `rloo`, `grpo` or `dpo` it must be that algorithm's. DPO trains on the
    preference data directly and needs no reward model: `rm: null` then drops the reward-model stages, and
    compare runs without scores unless a judge is there. `judge` (optional) is a second reward
    model, trained like `rm` but on a disjoint part of the preference data (`data.train_part`), whose merged
    copy scores every stage in `compare` as an independent judge.
    """

    sft: FitStage = field(default_factory=lambda: FitStage("configs/sft.yaml"))
    merge_sft: MergeStage = field(default_factory=MergeStage)
    rm: FitStage | None = field(default_factory=lambda: FitStage("configs/rm.yaml"))
    merge_rm: MergeStage = field(default_factory=MergeStage)
    ppo: FitStage = field(default_factory=lambda: FitStage("configs/ppo.yaml"))
    rl: FitStage | None = None
    rloo: FitStage | None = None
    grpo: FitStage | None = None
    dpo: FitStage | None = None
    judge: FitStage | None = None
    merge_judge: MergeStage = field(default_factory=MergeStage)
    compare: CompareStage = field(default_factory=lambda: CompareStage("configs/compare.yaml"))


class PipelineError(SystemExit):
    """Stops the pipeline with a message naming the stage (exit status 1)."""


def find_file(path: str) -> Path:
    """A config path relative to the working directory or, failing that, a packaged config (`configs/tiny/sft.yaml`
    names the one that ships with the package, from any directory)."""
    found = find_config(path)
    if found is not None:
        return found.resolve()
    raise PipelineError(f"pipeline: config file {path!r} not found (looked in . and in the packaged configs, "
                        f"{config_root()})")


class StageConfig:
    """A stage's config as the stage's own parser resolves it (stacked YAML files, then the command-line
    arguments, every spelling LightningCLI or jsonargparse accepts), for looking up output folders and the split.

    `command` is "fit" (LightningCLI) or "compare"; nothing is instantiated.
    """

    def __init__(self, command: str, configs: str | list[str] | None, overrides: list[str] = (),
                 stage: str = "") -> None:
        from alpaca_rlhf.parsers import parse_fit_config, parse_function_args

        self.paths = [find_file(c) for c in ([configs] if isinstance(configs, str) else configs or [])]
        args = [a for p in self.paths for a in ("--config", str(p))] + list(overrides)
        try:
            if command == "fit":
                self.config = parse_fit_config(args)
            else:
                from alpaca_rlhf.inference.comparison import compare

                self.config = parse_function_args(compare, command, args)
        except (SystemExit, Exception) as e:  # jsonargparse exits on a bad config: name the stage's files
            raise PipelineError(f"pipeline stopped before running anything: stage '{stage or command}': its config "
                                f"{[str(p) for p in self.paths]} with arguments {list(overrides)} does not parse: "
                                f"{e}") from None

    def get(self, dotted: str, default=None):
        value = self.config.get(dotted, None) if dotted in self.config else None
        return default if value is None else value

    def checkpoint_dir(self) -> Path | None:
        """The `ModelCheckpoint` dirpath, where `last.ckpt` is written."""
        for callback in self.get("trainer.callbacks", []) or []:
            if str(_field(callback, "class_path")).endswith("ModelCheckpoint"):
                dirpath = _field(_field(callback, "init_args") or {}, "dirpath")
                if dirpath:
                    return Path(dirpath)
        return None

    def tensorboard_dir(self) -> Path | None:
        logger = self._tensorboard_logger()
        if logger is None:
            return None
        args = _field(logger, "init_args") or {}
        return Path(_field(args, "save_dir") or ".", _field(args, "name") or "lightning_logs")

    def tensorboard_run(self) -> Path | None:
        """The run folder itself when the config pins its version (`version: run`), else None."""
        logger = self._tensorboard_logger()
        version = _field(_field(logger, "init_args") or {}, "version") if logger is not None else None
        if version is None:
            return None
        return self.tensorboard_dir() / (version if isinstance(version, str) else f"version_{version}")

    def _tensorboard_logger(self):
        logger = self.get("trainer.logger")
        logger = logger[0] if isinstance(logger, list) and logger else logger
        if logger is not None and not isinstance(logger, bool) and "TensorBoard" in str(_field(logger, "class_path")):
            return logger
        return None


def _field(node, key: str):
    return node.get(key) if isinstance(node, dict) else getattr(node, key, None)


@dataclass
class Stage:
    """One planned stage: its command and how to tell that it is done."""

    name: str
    args: list[str]  # after `python cli.py`
    output: Path  # what the stage produces (shown, checked, removed on a forced rerun)
    checkpoint_dir: Path | None = None  # a fit stage's ModelCheckpoint dirpath (resume)
    enabled: bool = True
    online: bool = False  # an online RL stage: it exports step_<n> folders

    def last_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        last = self.checkpoint_dir / "last.ckpt"
        return last if last.is_file() else None


def export_dir(config: StageConfig) -> str:
    """An adapter stage's export folder: its `output_dir`, or `adapter_dir` (the old name) where a config gives it."""
    old = config.get("model.init_args.adapter_dir")
    return str(old if old is not None else config.get("model.init_args.output_dir"))


def merged_dir(adapter_dir: str, stage: MergeStage) -> str:
    """The merge's output folder, spelled as the user spelled the adapter's (`./x` stays `./x-adapter-merged`)."""
    return stage.output_dir if stage.output_dir else exports.merged_folder(adapter_dir)


def rl_entry(stages: Stages) -> tuple[str, FitStage]:
    """(key, stage) of the RL stage: the one of `rl`, `rloo`, `grpo`, `dpo` given, else `ppo`."""
    given = [k for k in ("rl", "rloo", "grpo", "dpo") if getattr(stages, k) is not None]
    if len(given) > 1:
        raise PipelineError(f"pipeline: give one RL stage, got {', '.join(given)}")
    return (given[0], getattr(stages, given[0])) if given else ("ppo", stages.ppo)


def model_class(config: StageConfig, key: str) -> type:
    """The stage's LightningModule class, imported from its config's `model.class_path`."""
    path = str(config.get("model.class_path", ""))
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise PipelineError(f"pipeline: stage '{key}': cannot import its model class {path!r}: {e}") from e


def algorithm_of(config: StageConfig, key: str) -> tuple[str, bool]:
    """(name, online) of the RL stage's algorithm, from its module class: `dpo` for a `DPOModule`, else the
    `ALGORITHM` of an `OnlineRLModule` subclass (ppo, rloo, grpo, reinforce, or one of your own)."""
    cls = model_class(config, key)
    path = str(config.get("model.class_path", ""))
    from alpaca_rlhf.modules.dpo import DPOModule
    from alpaca_rlhf.modules.online import OnlineRLModule

    if isinstance(cls, type) and issubclass(cls, DPOModule):
        found, online = "dpo", False
    elif isinstance(cls, type) and issubclass(cls, OnlineRLModule):
        found, online = cls.ALGORITHM, True
    else:
        raise PipelineError(f"pipeline: stage '{key}': its model {path} is neither a DPOModule nor an online RL "
                            "module (an OnlineRLModule subclass: PPOModule, RLOOModule, GRPOModule, ...)")
    if key not in ("ppo", "rl") and found != key:
        raise PipelineError(f"pipeline: stage '{key}' runs {path}, a {found.upper()} module; use the 'rl' entry "
                            f"or a {key.upper()} config")
    return found, online


def fit_config(stage: FitStage, name: str, wiring: list[str] = ()) -> StageConfig:
    return StageConfig("fit", stage.config, [*wiring, *stage.overrides], name)


def plan(stages: Stages, partition: Partition | None = None) -> tuple[list[Stage], dict]:
    """The six stages with their wiring, and the paths the final message shows.

    With `partition`, every stage that reads preference data (rm, judge, the RL stage, compare) gets it, so all
    take their parts of one split (`alpaca_rlhf.data.partition`); compare evaluates on the `eval` part whenever
    the RL stage trains on a part."""
    split = ["--data.init_args.partition", json.dumps(asdict(partition))] if partition is not None else []
    sft = fit_config(stages.sft, "sft")
    sft_adapter = export_dir(sft)
    sft_merged = merged_dir(sft_adapter, stages.merge_sft)

    rm_wiring = ["--model.init_args.model.name_or_path", sft_merged, *split]
    rm = rm_adapter = rm_merged = None
    if stages.rm is not None:
        rm = fit_config(stages.rm, "rm", rm_wiring)
        rm_adapter = export_dir(rm)
        rm_merged = merged_dir(rm_adapter, stages.merge_rm)

    # the RL stage: `rl` or `ppo`, or `rloo`/`grpo`/`dpo` in its place; its config's module says which algorithm
    rl_key, rl_stage = rl_entry(stages)
    rl = fit_config(rl_stage, rl_key)
    rl_name, online = algorithm_of(rl, rl_key)
    key = "policy" if rl.get("model.init_args.policy") is not None else "model"  # policy: an online stage's old name
    ppo_wiring = [f"--model.init_args.{key}.name_or_path", sft_merged, *split]  # the merged SFT model is its start
    if rl_name == "dpo":  # trained on the preference data directly
        ppo = fit_config(rl_stage, "dpo", ppo_wiring)
        ppo_dir = Path(export_dir(ppo))
    else:
        if str(rl.get("model.init_args.scorer.class_path", "")).endswith("RewardModelScorer"):
            if rm_merged is None:
                raise PipelineError(f"pipeline: {rl_name.upper()}'s scorer is a reward model, but the pipeline has "
                                    "no rm stage")
            ppo_wiring += ["--model.init_args.scorer.init_args.model.name_or_path", rm_merged]
        ppo = fit_config(rl_stage, rl_name, ppo_wiring)
        ppo_dir = model_class(ppo, rl_name).export_folder(ppo.get("model.init_args.output_dir"))

    judge = judge_adapter = judge_merged = None
    if stages.judge is not None:
        judge = fit_config(stages.judge, "judge", rm_wiring)
        judge_adapter = export_dir(judge)
        judge_merged = merged_dir(judge_adapter, stages.merge_judge)

    base = sft.get("model.init_args.model.name_or_path", "meta-llama/Llama-3.1-8B")
    compare_wiring = ["--base_model", str(base), "--sft_model", sft_merged, "--rlhf_model", str(ppo_dir)]
    compare_wiring += ["--reward_model", rm_merged] if rm_merged else []
    compare_wiring += ["--judge_model", judge_merged] if judge_merged else []
    ppo_run = ppo.tensorboard_run() if online else None
    compare_wiring += ["--ppo_log_dir", str(ppo_run)] if ppo_run is not None else []  # the training-curve plot
    from alpaca_rlhf.data.prompts import PromptSource

    for key in PromptSource.names():
        if not online:  # DPO's data are pairs: compare keeps its own prompts
            break
        if key == "part":  # the RL stage trains on `rl`; compare takes `eval` (below)
            continue
        value = ppo.get(f"data.init_args.{key}")  # compare on PPO's held-out prompts: PPO's own prompt arguments
        if key == "partition" and value is not None:
            value = {k: _field(value, k) for k in Partition.__dataclass_fields__}
        as_json = value is None or isinstance(value, (bool, dict, list))
        compare_wiring += [f"--prompts.{key}", json.dumps(value) if as_json else str(value)]
    if online and ppo.get("data.init_args.part") is not None:
        compare_wiring += ["--prompts.part", "eval"]  # the prompts no stage trains on
    elif rl_name == "dpo" and partition is not None:
        compare_wiring += ["--prompts.partition", json.dumps(asdict(partition))]
    compare = StageConfig("compare", stages.compare.config, [*compare_wiring, *stages.compare.overrides], "compare")
    report_dir = Path(compare.get("report_dir", "output/compare"))

    def fit_args(config: StageConfig, wiring: list[str], stage: FitStage) -> list[str]:
        return ["fit", *[a for p in config.paths for a in ("--config", str(p))], *wiring, *stage.overrides]

    compare_config = ["--config", str(find_file(stages.compare.config))] if stages.compare.config else []
    planned = [
        Stage("sft", fit_args(sft, [], stages.sft), Path(sft_adapter), sft.checkpoint_dir()),
        Stage("merge_sft", ["merge", "--adapter_path", sft_adapter, "--output_dir", sft_merged,
                            "--dtype", stages.merge_sft.dtype], Path(sft_merged)),
        *([Stage("rm", fit_args(rm, rm_wiring, stages.rm), Path(rm_adapter), rm.checkpoint_dir()),
           Stage("merge_rm", ["merge", "--adapter_path", rm_adapter, "--output_dir", rm_merged,
                              "--dtype", stages.merge_rm.dtype], Path(rm_merged))] if rm else []),
        Stage(rl_name, fit_args(ppo, ppo_wiring, rl_stage), ppo_dir, ppo.checkpoint_dir(), online=online),
        *([Stage("judge", fit_args(judge, rm_wiring, stages.judge), Path(judge_adapter), judge.checkpoint_dir()),
           Stage("merge_judge", ["merge", "--adapter_path", judge_adapter, "--output_dir", judge_merged,
                                 "--dtype", stages.merge_judge.dtype], Path(judge_merged))] if judge else []),
        Stage("compare", ["compare", *compare_config, *compare_wiring, *stages.compare.overrides], report_dir,
              enabled=stages.compare.enabled),
    ]
    configs = [c for c in (sft, rm, ppo, judge) if c is not None]
    tensorboard = [d for d in (c.tensorboard_dir() for c in configs) if d]
    paths = {"report": report_dir / "report.md", "tensorboard": tensorboard, "sft": Path(sft_merged),
             "rm": Path(rm_merged) if rm_merged else None, "ppo": ppo_dir, "rl": rl_name,
             "judge": Path(judge_merged) if judge_merged else None}
    return planned, paths
