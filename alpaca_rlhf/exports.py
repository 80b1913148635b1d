"""The on-disk layout of every stage's output: the one module that writes and reads it.

- An adapter stage (SFT, RM, judge, DPO) writes a PEFT adapter folder: `adapter_config.json`,
  `adapter_model.safetensors`, the tokenizer and JSON side files (`template.json`, the RM's `reward_stats.json`).
- `merge` writes `<adapter>-adapter-merged` unless told where (`merged_folder`), a standalone checkpoint; an RL
  export's state comes along as `merged_from.json`, under a name no reader takes for an RL run.
- An online RL stage (PPO, RLOO, GRPO) writes `<output_dir>/step_<n>`: the adapter, `value_head.safetensors` when
  it has a value model, the tokenizer, `template.json` and the state file `ppo_state.json` (every online method
  writes it under PPO's name; `"finished": true` marks a run's last export).

Every write is whole or not at all (`io.atomic_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alpaca_rlhf.io import atomic_dir

STATE_FILE = "ppo_state.json"  # an online stage's export state (the pipeline, inference and push read it)
VALUE_HEAD_FILE = "value_head.safetensors"
TEMPLATE_FILE = "template.json"
MERGED_FROM_FILE = "merged_from.json"  # a merged RL export's provenance
MERGED_SUFFIX = "-adapter-merged"  # `merge` writes <adapter>-adapter-merged unless told where
STEP_PREFIX = "step_"


# ---- names ---------------------------------------------------------------------------------------------------
def merged_folder(adapter: str | os.PathLike) -> str:
    """Where `merge` writes an adapter's merged model by default, spelled as the adapter is (`./x/` -> `./x` +
    suffix): the one rule every stage, the pipeline and the preflight use."""
    return str(adapter).rstrip("/") + MERGED_SUFFIX


def adapter_of_merged(merged: str | os.PathLike) -> Path | None:
    """The adapter folder a default-named merged folder comes from (None for another name)."""
    name = str(merged).rstrip("/")
    return Path(name.removesuffix(MERGED_SUFFIX)) if name.endswith(MERGED_SUFFIX) else None


def step_name(iteration: int) -> str:
    """The export folder of an online run after `iteration` iterations."""
    return f"{STEP_PREFIX}{iteration}"


def step_number(folder: Path) -> int:
    return int(folder.name.split("_")[-1])


# ---- reading -------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def template_of(folder: Path) -> str:
    """The prompt template a stage's folder was trained with: its `template.json`, else the Alpaca default."""
    return str(folder / TEMPLATE_FILE) if (folder / TEMPLATE_FILE).is_file() else "alpaca"


def read_state(export: Path) -> dict | None:
    """An RL export's state (None if it has none)."""
    return read_json(Path(export) / STATE_FILE)


def is_rl_output(folder: Path) -> bool:
    """Whether `folder` is an RL export or an RL run's output_dir."""
    folder = Path(folder)
    return (folder / STATE_FILE).is_file() or any(folder.glob(f"{STEP_PREFIX}*/{STATE_FILE}"))


def rl_exports(output_dir: Path) -> list[Path]:
    """Every `step_<n>` export with a state file in an RL run's output_dir."""
    return [p.parent for p in Path(output_dir).glob(f"{STEP_PREFIX}*/{STATE_FILE}")]


def finished_export(output_dir: Path) -> Path | None:
    """The export a finished run marked `"finished": true` (the most recently written if several are)."""
    finished = [p for p in rl_exports(output_dir) if (read_state(p) or {}).get("finished") is True]
    return max(finished, key=lambda p: (p / STATE_FILE).stat().st_mtime) if finished else None


def newest_export(output_dir: Path, since: float) -> Path | None:
    """The `step_<n>` export with the largest n written since `since` (or at all, if none was)."""
    exports = rl_exports(output_dir)
    recent = [p for p in exports if (p / STATE_FILE).stat().st_mtime >= since - 1] or exports
    return max(recent, key=step_number) if recent else None


def latest_export(path: str | Path) -> Path:
    """An RL export folder: `path` itself if it holds an adapter, else the run's final export (the one its
    state file marks finished; the most recently written if several are), else the largest `step_<n>`."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    steps = [p for p in path.glob(f"{STEP_PREFIX}*") if p.name[len(STEP_PREFIX):].isdigit()
             and (p / "adapter_config.json").is_file()]
    if not steps:
        raise FileNotFoundError(f"{path}: neither a PPO export (adapter_config.json) nor a folder of "
                                "step_<n> exports")
    return finished_export(path) or max(steps, key=step_number)


def resolve_base(recorded: str, folder: str | os.PathLike) -> str:
    """The base model an adapter or export recorded, usually a path relative to the working directory of its run.

    Taken as given if it exists or is absolute, else relative to each parent of `folder` (the run's working
    directory is one of them when the folder sits below it, as `output/.../step_<n>` does); a name found nowhere
    is taken as a hub id.
    """
    if Path(recorded).exists() or Path(recorded).is_absolute():
        return recorded
    for parent in Path(folder).resolve().parents:
        if (parent / recorded / "config.json").is_file():
            return str(parent / recorded)
    return recorded


# ---- writing -------------------------------------------------------------------------------------------------
def export_adapter(peft_model, tokenizer, output_dir: str | os.PathLike, extra_files: dict | None = None) -> Path:
    """Saves the adapter in PEFT's format, the tokenizer and extra JSON files, whole or not at all."""
    with atomic_dir(output_dir) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            Path(tmp, name).write_text(json.dumps(content, indent=2))
    return Path(output_dir)


def export_rl(target: Path, peft_model, tokenizer, state: dict, template: dict,
              value_head: dict | None = None, merge_into=None) -> Path:
    """Writes an online run's export `target` (a `step_<n>` folder), whole or not at all: the adapter, the
    tokenizer, the value head's trainable tensors (if any), the template and the state file; `merge_into(folder)`,
    if given, adds a merged standalone copy inside the folder before it is published."""
    from safetensors.torch import save_file

    with atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if value_head is not None:
            save_file(value_head, str(tmp / VALUE_HEAD_FILE))
        (tmp / TEMPLATE_FILE).write_text(json.dumps(template, indent=2))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if merge_into is not None:
            merge_into(tmp)
    return target


def clear_earlier_exports(trainer, output_dir: Path, name: str, resume_requested: bool, overwrite: bool) -> None:
    """Before a new online run (not a resume): an output_dir holding another run's exports stops it, unless
    `overwrite` (they are removed) or the run was asked to resume and found no checkpoint (a run killed between
    its first export and its first checkpoint: it starts over and writes those unfinished exports again)."""
    from lightning.pytorch.utilities import rank_zero_warn

    old = sorted(rl_exports(output_dir))
    if not old:
        return
    killed_early = resume_requested and not any((read_state(p) or {}).get("finished") for p in old)
    if killed_early:
        rank_zero_warn(f"--ckpt_path was given but there is no checkpoint to resume: {name} starts over and replaces "
                       f"the unfinished exports {', '.join(p.name for p in old)} in {str(output_dir)!r}, left by a "
                       "run killed before its first checkpoint")
    elif not overwrite:
        raise FileExistsError(
            f"{name} output_dir {str(output_dir)!r} holds exports of an earlier run "
            f"({', '.join(p.name for p in old)}); "
            "resume that run with --ckpt_path last, choose another output_dir, or set "
            "model.init_args.overwrite_output_dir: true to remove them")
    trainer.strategy.barrier()  # every rank has looked before rank 0 removes
    if trainer.is_global_zero:
        for folder in old:
            shutil.rmtree(folder)
    trainer.strategy.barrier()
