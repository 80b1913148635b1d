"""The whole recipe from one YAML: SFT -> merge -> reward model -> merge -> PPO -> compare.

    python cli.py pipeline --config configs/tiny/pipeline.yaml          # CPU, minutes, nothing downloaded
    python cli.py pipeline --config configs/tiny/pipeline.yaml --force  # redo every stage
    python cli.py pipeline --config configs/tiny/pipeline.yaml --from_stage ppo  # redo PPO and compare

Each stage is the command a user would type (`python cli.py fit --config ...`, `python cli.py merge ...`,
`python cli.py compare ...`), run in a subprocess with its output in `<output_dir>/logs/<stage>.log`, so a
failure is isolated and named. The pipeline adds only the wiring: the merged SFT model becomes the reward
model's base and PPO's policy, the merged reward model PPO's scorer, and compare gets all of them plus PPO's
held-out prompts. Wiring comes before a stage's own `overrides`, so an explicit override wins.

A stage whose output exists is skipped; one that has a `last.ckpt` but no output was interrupted and resumes
with `--ckpt_path last`. Once a stage runs, every later stage runs too (its inputs changed), from scratch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = ("sft", "merge_sft", "rm", "merge_rm", "ppo", "compare")


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
        output_dir: Where the merged model goes; None = `<adapter_dir>-adapter-merged`.
    """

    dtype: str = "float32"
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
    """Every stage's config; the defaults are the real (Llama-3.1-8B, GPU) configs."""

    sft: FitStage = field(default_factory=lambda: FitStage("configs/sft.yaml"))
    merge_sft: MergeStage = field(default_factory=MergeStage)
    rm: FitStage = field(default_factory=lambda: FitStage("configs/rm.yaml"))
    merge_rm: MergeStage = field(default_factory=MergeStage)
    ppo: FitStage = field(default_factory=lambda: FitStage("configs/ppo.yaml"))
    compare: CompareStage = field(default_factory=lambda: CompareStage("configs/compare.yaml"))


class PipelineError(SystemExit):
    """Stops the pipeline with a message naming the stage (exit status 1)."""


# ---- reading the stage configs -----------------------------------------------------------------------------
def find_file(path: str) -> Path:
    """A config path relative to the working directory or, failing that, to the repository root."""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise PipelineError(f"pipeline: config file {path!r} not found (looked in . and {ROOT})")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class StageConfig:
    """A stage's YAML (stacked configs merged) with its command-line overrides, for looking up a few values.

    Only what the pipeline needs to know (output folders, the data split) is read; jsonargparse in the stage's
    own process remains the authority on the full config.
    """

    def __init__(self, configs: str | list[str] | None, overrides: list[str] = ()) -> None:
        self.paths = [find_file(c) for c in ([configs] if isinstance(configs, str) else configs or [])]
        self.data: dict = {}
        for p in self.paths:
            self.data = _deep_merge(self.data, yaml.safe_load(p.read_text()) or {})
        self.overrides = _parse_overrides(overrides)

    def get(self, dotted: str, default=None):
        if dotted in self.overrides:
            return yaml.safe_load(self.overrides[dotted])
        node = self.data
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return default if node is None else node

    def checkpoint_dir(self) -> Path | None:
        """The `ModelCheckpoint` dirpath, where `last.ckpt` is written."""
        for callback in self.get("trainer.callbacks", []) or []:
            if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                dirpath = (callback.get("init_args") or {}).get("dirpath")
                if dirpath:
                    return Path(dirpath)
        return None

    def tensorboard_dir(self) -> Path | None:
        logger = self.get("trainer.logger")
        if isinstance(logger, dict) and "TensorBoard" in str(logger.get("class_path", "")):
            args = logger.get("init_args") or {}
            return Path(args.get("save_dir", "."), args.get("name", "lightning_logs"))
        return None


def _parse_overrides(tokens: list[str]) -> dict[str, str]:
    """`["--a.b", "1", "--c=2"]` -> {"a.b": "1", "c": "2"} (the last occurrence wins, as in jsonargparse)."""
    out, i = {}, 0
    tokens = list(tokens)
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and "=" in token:
            key, value = token[2:].split("=", 1)
            out[key] = value
        elif token.startswith("--") and i + 1 < len(tokens):
            out[token[2:]] = tokens[i + 1]
            i += 1
        i += 1
    return out


# ---- the plan ----------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One planned stage: its command and how to tell that it is done."""

    name: str
    args: list[str]  # after `python cli.py`
    output: Path  # what the stage produces (shown, checked, removed on a forced rerun)
    checkpoint_dir: Path | None = None  # a fit stage's ModelCheckpoint dirpath (resume)
    enabled: bool = True

    def last_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        last = self.checkpoint_dir / "last.ckpt"
        return last if last.is_file() else None


def merged_dir(adapter_dir: str, stage: MergeStage) -> Path:
    return Path(stage.output_dir) if stage.output_dir else Path(adapter_dir + "-adapter-merged")


def plan(stages: Stages) -> tuple[list[Stage], dict]:
    """The six stages with their wiring, and the paths the final message shows."""
    sft = StageConfig(stages.sft.config, stages.sft.overrides)
    sft_adapter = sft.get("model.init_args.adapter_dir", "output/lora-alpaca")
    sft_merged = merged_dir(sft_adapter, stages.merge_sft)

    rm_wiring = ["--model.init_args.model.name_or_path", str(sft_merged)]
    rm = StageConfig(stages.rm.config, rm_wiring + stages.rm.overrides)
    rm_adapter = rm.get("model.init_args.adapter_dir", "output/reward_model")
    rm_merged = merged_dir(rm_adapter, stages.merge_rm)

    ppo_wiring = ["--model.init_args.policy.name_or_path", str(sft_merged)]
    ppo_yaml = StageConfig(stages.ppo.config)
    if str(ppo_yaml.get("model.init_args.scorer.class_path", "")).endswith("RewardModelScorer"):
        ppo_wiring += ["--model.init_args.scorer.init_args.model.name_or_path", str(rm_merged)]
    ppo = StageConfig(stages.ppo.config, ppo_wiring + stages.ppo.overrides)
    ppo_dir = Path(ppo.get("model.init_args.output_dir", "output/checkpoints/tuning_llama_rl"))

    compare = StageConfig(stages.compare.config, stages.compare.overrides)
    report_dir = Path(compare.get("report_dir", "output/compare"))
    held_out = {"data_path": "yahma/alpaca-cleaned", "val_set_size": 64, "seed": 42, "max_prompt_length": 256}
    base = sft.get("model.init_args.model.name_or_path", "meta-llama/Llama-3.1-8B")
    compare_wiring = ["--base_model", str(base), "--sft_model", str(sft_merged), "--rlhf_model", str(ppo_dir),
                      "--reward_model", str(rm_merged)]
    for key, default in held_out.items():  # compare on PPO's validation prompts, held out of its training
        compare_wiring += [f"--prompts.{key}", str(ppo.get(f"data.init_args.{key}", default))]

    def fit_args(stage: FitStage, wiring: list[str]) -> list[str]:
        configs = [stage.config] if isinstance(stage.config, str) else stage.config
        config_args = [a for c in configs for a in ("--config", str(find_file(c)))]
        return ["fit", *config_args, *wiring, *stage.overrides]

    compare_config = ["--config", str(find_file(stages.compare.config))] if stages.compare.config else []
    planned = [
        Stage("sft", fit_args(stages.sft, []), Path(sft_adapter), sft.checkpoint_dir()),
        Stage("merge_sft", ["merge", "--adapter_path", sft_adapter, "--output_dir", str(sft_merged),
                            "--dtype", stages.merge_sft.dtype], sft_merged),
        Stage("rm", fit_args(stages.rm, rm_wiring), Path(rm_adapter), rm.checkpoint_dir()),
        Stage("merge_rm", ["merge", "--adapter_path", rm_adapter, "--output_dir", str(rm_merged),
                           "--dtype", stages.merge_rm.dtype], rm_merged),
        Stage("ppo", fit_args(stages.ppo, ppo_wiring), ppo_dir, ppo.checkpoint_dir()),
        Stage("compare", ["compare", *compare_config, *compare_wiring, *stages.compare.overrides], report_dir,
              enabled=stages.compare.enabled),
    ]
    tensorboard = [d for d in (sft.tensorboard_dir(), rm.tensorboard_dir(), ppo.tensorboard_dir()) if d]
    paths = {"report": report_dir / "report.md", "tensorboard": tensorboard, "sft": sft_merged,
             "rm": rm_merged, "ppo": ppo_dir}
    return planned, paths


# ---- done, resume, invalidate ------------------------------------------------------------------------------
def ppo_final_export(ppo_dir: Path, marker: Path) -> Path | None:
    """The finished PPO run's last export: marked `"finished": true` in its ppo_state.json, or recorded by the
    pipeline when the PPO stage exited successfully."""
    finished = [p.parent for p in ppo_dir.glob("step_*/ppo_state.json")
                if json.loads(p.read_text()).get("finished") is True]
    if finished:
        return max(finished, key=lambda p: int(p.name.split("_")[-1]))
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("export")
        export = ppo_dir / Path(recorded).name if recorded else None  # paths are relative to the run's cwd
        if export is not None and (export / "adapter_config.json").is_file():
            return export
    return None


def finished_output(stage: Stage, logs: Path) -> Path | None:
    """The stage's finished output, or None if it has not finished."""
    out = stage.output
    if stage.name in ("sft", "rm"):
        files = ["adapter_model.safetensors"] + (["reward_stats.json"] if stage.name == "rm" else [])
        return out if all((out / f).is_file() for f in files) else None
    if stage.name.startswith("merge"):
        return out if (out / "config.json").is_file() else None
    if stage.name == "ppo":
        return ppo_final_export(out, logs / "ppo.done.json")
    return out / "report.md" if (out / "report.md").is_file() and (out / "summary.json").is_file() else None


def is_done(stage: Stage, logs: Path) -> bool:
    return finished_output(stage, logs) is not None


def invalidate(stage: Stage, logs: Path) -> list[Path]:
    """Removes a stage's previous output and `last.ckpt`, so a forced rerun starts clean and a rerun after an
    interruption cannot mistake the old output for the new one. Only folders holding the files the stage
    writes are removed."""
    removed = []
    out = stage.output
    if stage.name == "ppo":
        targets = [p.parent for p in out.glob("step_*/ppo_state.json")]
    elif stage.name == "compare":
        targets = [out / f for f in ("report.md", "summary.json", "outputs.jsonl")]
    else:
        marker = "config.json" if stage.name.startswith("merge") else "adapter_config.json"
        targets = [out] if (out / marker).is_file() else []
    last = stage.last_checkpoint()
    targets += [last] if last else []
    targets += [logs / f"{stage.name}.done.json"]
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.is_file():
            target.unlink()
        else:
            continue
        removed.append(target)
    return removed


def newest_export(ppo_dir: Path, since: float) -> Path | None:
    """The `step_<n>` export with the largest n written since `since` (or at all, if none was)."""
    exports = [p.parent for p in ppo_dir.glob("step_*/ppo_state.json")]
    recent = [p for p in exports if (p / "ppo_state.json").stat().st_mtime >= since - 1] or exports
    return max(recent, key=lambda p: int(p.name.split("_")[-1])) if recent else None


# ---- running -----------------------------------------------------------------------------------------------
def _cli() -> Path:
    cli = ROOT / "cli.py"
    if not cli.is_file():
        raise PipelineError(f"pipeline: {cli} not found; run the pipeline from a checkout of the repository")
    return cli


def run_stage(stage: Stage, log_file: Path, tag: str) -> tuple[int, float]:
    """Runs one stage's command with its output in `log_file`; on a terminal, shows the latest log line."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(_cli()), *stage.args]
    start = time.time()
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                if sys.stdout.isatty():
                    columns = shutil.get_terminal_size().columns - 1
                    status = f"{tag} {time.time() - start:5.0f} s  {_last_line(log_file)}"
                    print("\r" + status[:columns].ljust(columns), end="", flush=True)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise PipelineError(f"\npipeline interrupted in stage '{stage.name}'; run the same command again "
                                f"to resume it (log: {log_file})") from None
    if sys.stdout.isatty():
        print("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r", end="")
    return proc.returncode, time.time() - start


def _last_line(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 2000))
        lines = [x.strip() for x in f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()]
    return next((x for x in reversed(lines) if x), "")


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines[-n:] if line.strip())


def pipeline(
    stages: Stages = Stages(),  # noqa: B008 - read-only default, shown by --help
    output_dir: str = "output",
    force: bool = False,
    from_stage: str | None = None,
    dry_run: bool = False,
) -> dict:
    """Runs SFT -> merge -> reward model -> merge -> PPO -> compare, each stage's output wired into the next.

    Args:
        stages: Each stage's config and overrides (see configs/pipeline.yaml).
        output_dir: Where `logs/<stage>.log` go.
        force: Rerun every stage from scratch, removing its previous output and last.ckpt first.
        from_stage: Rerun from this stage on (sft, merge_sft, rm, merge_rm, ppo, compare); earlier finished
            stages are kept.
        dry_run: Print what would run (skip / resume / run, and the commands) without running anything.
    """
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise PipelineError(f"pipeline: --from_stage must be one of {STAGE_NAMES}, got {from_stage!r}")
    planned, paths = plan(stages)
    planned = [s for s in planned if s.enabled]
    logs = Path(output_dir) / "logs"
    started, n = time.time(), len(planned)
    rerun = force
    times: dict[str, float] = {}
    for i, stage in enumerate(planned, start=1):
        tag = f"[{i}/{n}] {stage.name}"
        rerun = rerun or stage.name == from_stage
        done = None if rerun else finished_output(stage, logs)
        if done is not None:
            print(f"{tag} ... skipped: {done} exists", flush=True)
            continue
        args = list(stage.args)
        export = ppo_final_export(paths["ppo"], logs / "ppo.done.json")
        if stage.name == "compare" and export is not None:  # the PPO run's own final export, not the newest
            args[args.index("--rlhf_model") + 1] = str(export)
        note = ""
        if rerun:
            removed = [] if dry_run else invalidate(stage, logs)
            note = f" (removed previous {', '.join(str(p) for p in removed)})" if removed else ""
        elif stage.last_checkpoint() is not None:
            args += ["--ckpt_path", "last"]
            note = f" (resuming from {stage.last_checkpoint()})"
        stage = Stage(stage.name, args, stage.output, stage.checkpoint_dir)
        log_file = logs / f"{stage.name}.log"
        if dry_run:
            print(f"{tag} ... would run{note}: python cli.py {' '.join(args)}", flush=True)
            rerun = True
            continue
        print(f"{tag} ... running{note}; log: {log_file}", flush=True)
        stage_start = time.time()
        code, seconds = run_stage(stage, log_file, tag)
        if code != 0:
            print(_tail(log_file), file=sys.stderr)
            raise PipelineError(f"pipeline stopped: stage '{stage.name}' failed (exit {code}); "
                                f"see {log_file}")
        record = {"stage": stage.name, "seconds": round(seconds, 1), "command": ["cli.py", *args],
                  "output": str(stage.output)}
        if stage.name == "ppo":
            export = newest_export(stage.output, stage_start)
            if export is None:
                raise PipelineError("pipeline stopped: stage 'ppo' exited without an export in "
                                    f"{stage.output}; see {log_file}")
            record["export"] = str(export)
        (logs / f"{stage.name}.done.json").write_text(json.dumps(record, indent=2))
        times[stage.name] = seconds
        print(f"{tag} ... done ({seconds:.0f} s)", flush=True)
        rerun = True  # everything after a stage that ran depends on its new output
    if dry_run:
        return {}
    return finish(paths, logs, time.time() - started, times)


def finish(paths: dict, logs: Path, seconds: float, times: dict[str, float]) -> dict:
    """Prints the headline numbers and where the report, TensorBoard logs and checkpoints are."""
    print(f"\npipeline finished in {seconds / 60:.1f} min" + (
        " (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")" if times else " (nothing to do)"))
    summary_file = paths["report"].parent / "summary.json"
    summary = json.loads(summary_file.read_text()).get("summary", {}) if summary_file.is_file() else {}
    for stage, stats in summary.get("stages", {}).items():
        score = "–" if stats["score_mean"] is None else f"{stats['score_mean']:.3f}"
        print(f"  {stage:5s} mean reward score {score:>7s}   follows template {stats['follows_template']:4.0%}"
              f"   empty {stats.get('empty', 0.0):4.0%}   {stats['response_tokens']:5.1f} tokens")
    for name, value in summary.get("reward_anchors", {}).items():
        print(f"  ({name}: mean reward score {value:.3f})")
    if "rlhf_vs_sft" in summary:
        print(f"  win rate of RLHF over SFT: {summary['rlhf_vs_sft']['win_rate']:.1%}")
    if "kl_rlhf_to_sft" in summary:
        print(f"  KL(RLHF || SFT): {summary['kl_rlhf_to_sft']['mean']:.3f} nats per response")
    ppo_export = ppo_final_export(paths["ppo"], logs / "ppo.done.json")
    tensorboard = sorted({str(d.parent) for d in paths["tensorboard"]})
    print(f"report:      {paths['report']} (all outputs: {paths['report'].parent / 'outputs.jsonl'})")
    print(f"TensorBoard: tensorboard --logdir {' --logdir '.join(tensorboard) if tensorboard else '(none)'}  "
          f"(runs: {', '.join(str(d) for d in paths['tensorboard'])})")
    print(f"checkpoints: SFT {paths['sft']}, reward model {paths['rm']}, PPO {ppo_export or paths['ppo']}")
    print(f"logs:        {logs}/<stage>.log")
    return summary
