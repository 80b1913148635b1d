"""The whole recipe from one YAML: SFT -> merge -> reward model -> merge -> PPO -> compare.

    alpaca-rlhf pipeline --config configs/tiny/pipeline.yaml          # CPU, minutes, nothing downloaded
    alpaca-rlhf pipeline --config configs/tiny/pipeline.yaml --force  # redo every stage
    alpaca-rlhf pipeline --config configs/tiny/pipeline.yaml --from_stage ppo  # redo PPO and compare

Each stage is the command a user would type (`python cli.py fit --config ...`, `python cli.py merge ...`,
`python cli.py compare ...`), run in a subprocess with its output in `<output_dir>/logs/<stage>.log`, so a
failure is isolated and named. The pipeline adds only the wiring: the merged SFT model becomes the reward
model's base and PPO's policy, the merged reward model PPO's scorer, and compare gets all of them plus PPO's
held-out prompts. Wiring comes before a stage's own `overrides`, so an explicit override wins.

A stage whose output exists is skipped; one that has a `last.ckpt` but no output was interrupted and resumes
with `--ckpt_path last`. Once a stage runs, a later finished stage is kept only if the outputs it was trained on
are byte for byte those it recorded (`inputs` in `logs/<stage>.done.json`): re-merging a deleted merged folder
keeps the reward model, PPO and compare; anything else that changed reruns them from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from alpaca_rlhf import exports
from alpaca_rlhf.data.partition import Partition
from alpaca_rlhf.exports import newest_export
from alpaca_rlhf.io import PROGRESS_ENV, write_text_whole
from alpaca_rlhf.plan import (  # noqa: F401  (the plan's names: their old home was here)
    ONLINE,
    PACKAGE_PARENT,
    RL_NAMES,
    STAGE_NAMES,
    CompareStage,
    FitStage,
    MergeStage,
    PipelineError,
    Stage,
    StageConfig,
    Stages,
    algorithm_of,
    find_file,
    fit_config,
    merged_dir,
    plan,
    rl_entry,
)

# without a terminal (a log, CI), one progress line a minute (ALPACA_RLHF_PROGRESS_EVERY seconds)
PROGRESS_EVERY_S = float(os.environ.get("ALPACA_RLHF_PROGRESS_EVERY", 60))


# ---- done, resume, invalidate ------------------------------------------------------------------------------
def ppo_final_export(ppo_dir: Path, marker: Path) -> Path | None:
    """The finished PPO run's last export: marked `"finished": true` in its ppo_state.json, or recorded by the
    pipeline when the PPO stage exited successfully."""
    finished = exports.finished_export(ppo_dir)  # the newest run's
    if finished is not None:
        return finished
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("export")
        export = ppo_dir / Path(recorded).name if recorded else None  # paths are relative to the run's cwd
        if export is not None and (export / "adapter_config.json").is_file():
            return export
    return None


def finished_output(stage: Stage, logs: Path) -> Path | None:
    """The stage's finished output, or None if it has not finished."""
    out = stage.output
    if stage.name in ("sft", "rm", "judge", "dpo"):
        files = ["adapter_model.safetensors"] + (["reward_stats.json"] if stage.name in ("rm", "judge") else [])
        return out if all((out / f).is_file() for f in files) else None
    if stage.name.startswith("merge"):
        return out if (out / "config.json").is_file() else None
    if stage.online:
        return ppo_final_export(out, logs / f"{stage.name}.done.json")
    return out / "report.md" if (out / "report.md").is_file() and (out / "summary.json").is_file() else None


def is_done(stage: Stage, logs: Path) -> bool:
    return finished_output(stage, logs) is not None


def invalidate(stage: Stage, logs: Path) -> list[Path]:
    """Removes a stage's previous output and `last.ckpt`, so a forced rerun starts clean and a rerun after an
    interruption cannot mistake the old output for the new one. Only folders holding the files the stage
    writes are removed."""
    removed = []
    out = stage.output
    if stage.online:
        targets = exports.rl_exports(out)
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


def fingerprint(path: Path) -> str:
    """A content hash of a stage's output (a file or every file of a folder, by relative path): a merge rerun
    that writes the same bytes leaves it unchanged, so the stages trained on it are kept."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


_FINGERPRINTS: dict[tuple[str, float, int], str] = {}


def fingerprints(outputs: dict[str, Path]) -> dict[str, str]:
    """{stage: fingerprint of its output} of the earlier stages (cached per path and modification time)."""
    result = {}
    for name, path in outputs.items():
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime, stat.st_size)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = fingerprint(path)
        result[name] = _FINGERPRINTS[key]
    return result


def _recorded_inputs(logs: Path, name: str) -> dict | None:
    done = logs / f"{name}.done.json"
    return json.loads(done.read_text()).get("inputs") if done.is_file() else None


# ---- running -----------------------------------------------------------------------------------------------
def run_stage(stage: Stage, log_file: Path, tag: str) -> tuple[int, float]:
    """Runs one stage's command with its output in `log_file`; on a terminal, shows the latest log line."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "alpaca_rlhf", *stage.args]  # the installed package, no checkout needed
    # the package's own folder first on the path, as in this process (a checkout run as `python cli.py` too)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT),
                                                                     os.environ.get("PYTHONPATH")]))}
    progress = log_file.with_name(f"{stage.name}.progress.json")  # the stage's own step, total, loss/score, ETA
    progress.unlink(missing_ok=True)
    env[PROGRESS_ENV] = str(progress)
    start = printed = time.time()
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                if sys.stdout.isatty():
                    columns = shutil.get_terminal_size().columns - 1
                    status = f"{tag} {time.time() - start:5.0f} s  {progress_line(progress) or _last_line(log_file)}"
                    print("\r" + status[:columns].ljust(columns), end="", flush=True)
                elif time.time() - printed >= PROGRESS_EVERY_S:  # a log, not a screen: a line a minute
                    line = progress_line(progress)
                    if line:
                        printed = time.time()
                        print(f"{tag} {printed - start:5.0f} s  {line}", flush=True)
        except KeyboardInterrupt:  # the stage got the Ctrl-C too: a fit run saves a checkpoint after its step
            print(f"\n{tag}: Ctrl-C; waiting for the stage to save and stop (Ctrl-C again stops it now)", flush=True)
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
            raise PipelineError(f"\npipeline interrupted in stage '{stage.name}'; run the same command again "
                                f"to resume it (log: {log_file})") from None
    if sys.stdout.isatty():
        print("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r", end="")
    return proc.returncode, time.time() - start


def progress_line(path: Path) -> str | None:
    """"step 40/100 (40%)  loss 0.683  ETA 2.5 min" from a stage's progress file (None before it has one)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    step, total = state["step"], state.get("total")
    parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
    parts += [f"{key} {value:.3g}" for key, value in state.get("metrics", {}).values()]
    eta = state.get("eta_s")
    if eta is not None:
        parts.append(f"ETA {eta / 60:.1f} min" if eta >= 90 else f"ETA {eta:.0f} s")
    return "  ".join(parts)


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
    partition: Partition | None = None,
) -> dict:
    """Runs SFT -> merge -> reward model -> merge -> PPO -> compare, each stage's output wired into the next.

    Args:
        stages: Each stage's config and overrides (see configs/pipeline.yaml).
        output_dir: Where `logs/<stage>.log` go.
        force: Rerun every stage from scratch, removing its previous output and last.ckpt first.
        from_stage: Rerun from this stage on (sft, merge_sft, rm, merge_rm, the RL stage (ppo, rloo, grpo or
            dpo: any of them names it), judge, merge_judge, compare); earlier finished stages are kept.
        dry_run: Print what would run (skip / resume / run, and the commands) without running anything.
        partition: One split of the preference data by prompt for every stage (`alpaca_rlhf.data.partition`):
            passed to rm, judge and the RL stage as `data.partition` and to compare as `prompts.partition`, so
            the reward model, the RL prompts, DPO's pairs, the held-out pairs and compare's prompts are disjoint.
            None = each stage's own (the configs' defaults are one and the same split).
    """
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise PipelineError(f"pipeline: --from_stage must be one of {STAGE_NAMES}, got {from_stage!r}")
    print("checking the stages' configs ...", flush=True)  # each is parsed by its own command's parser
    planned, paths = plan(stages, partition)
    planned = [s for s in planned if s.enabled]
    names = [s.name for s in planned]
    if from_stage is not None and from_stage not in names and not (from_stage in RL_NAMES and paths["rl"] in names):
        raise PipelineError(f"pipeline: --from_stage {from_stage!r} is not a stage of this pipeline; its stages are "
                            f"{', '.join(names)}")
    logs = Path(output_dir) / "logs"
    if not dry_run:
        add_time(logs, invocation=True, reset=force)
    started, n = time.time(), len(planned)
    explicit = force  # --force, or --from_stage reached: rerun from scratch whatever the inputs
    ran = False  # a stage ran in this invocation: later finished stages are kept only if their inputs are unchanged
    outputs: dict[str, Path] = {}  # each earlier stage's output as it is now (what later stages read)
    times: dict[str, float] = {}
    for i, stage in enumerate(planned, start=1):
        tag = f"[{i}/{n}] {stage.name}"
        explicit = explicit or stage.name == from_stage or (from_stage in RL_NAMES and stage.name == paths["rl"])
        done = None if explicit else finished_output(stage, logs)
        stale = explicit
        if done is not None and ran and not dry_run:
            recorded = _recorded_inputs(logs, stage.name)
            if recorded is None or recorded != fingerprints(outputs):
                done, stale = None, True  # an input it was trained on changed (or is unknown): rerun it
        elif done is None and ran:
            stale = True  # an earlier stage's output changed: a checkpoint of this one is stale
        if done is not None:
            print(f"{tag} ... skipped: {done} exists" + (" (its inputs are unchanged)" if ran else ""), flush=True)
            outputs[stage.name] = done
            continue
        args = list(stage.args)
        export = ppo_final_export(paths["ppo"], logs / f"{paths['rl']}.done.json")
        if stage.name == "compare" and export is not None:  # the PPO run's own final export, not the newest
            args[args.index("--rlhf_model") + 1] = str(export)
        note = ""
        if stale:
            removed = [] if dry_run else invalidate(stage, logs)
            note = f" (removed previous {', '.join(str(p) for p in removed)})" if removed else ""
        elif stage.last_checkpoint() is not None:
            args += ["--ckpt_path", "last"]
            note = f" (resuming from {stage.last_checkpoint()})"
        if args[0] == "fit" and "--ckpt_path" not in args:  # the pipeline decided to start this stage over
            args += ["--overwrite", "true"]
        stage = replace(stage, args=args)
        log_file = logs / f"{stage.name}.log"
        if dry_run:
            print(f"{tag} ... would run{note}: alpaca-rlhf {' '.join(args)}", flush=True)
            ran = explicit = True
            continue
        print(f"{tag} ... running{note}; log: {log_file}", flush=True)
        stage_start = time.time()
        try:
            code, seconds = run_stage(stage, log_file, tag)
        finally:
            add_time(logs, stage.name, time.time() - stage_start)  # interrupted or failed attempts count too
        if code != 0:
            print(_tail(log_file), file=sys.stderr)
            raise PipelineError(f"pipeline stopped: stage '{stage.name}' failed (exit {code}); "
                                f"see {log_file}")
        record = {"stage": stage.name, "seconds": round(seconds, 1), "command": ["cli.py", *args],
                  "output": str(stage.output), "inputs": fingerprints(outputs)}
        if stage.online:
            export = newest_export(stage.output, stage_start)
            if export is None:
                raise PipelineError(f"pipeline stopped: stage '{stage.name}' exited without an export in "
                                    f"{stage.output}; see {log_file}")
            record["export"] = str(export)
        (logs / f"{stage.name}.done.json").write_text(json.dumps(record, indent=2))
        outputs[stage.name] = finished_output(stage, logs) or stage.output
        times[stage.name] = seconds
        print(f"{tag} ... done ({seconds:.0f} s)", flush=True)
        ran = True
    if dry_run:
        return {}
    return finish(paths, logs, time.time() - started, times)


def add_time(logs: Path, stage: str | None = None, seconds: float = 0.0, invocation: bool = False,
             reset: bool = False) -> dict:
    """The run's time ledger `logs/time.json`: seconds per stage over every attempt (interrupted ones too) and the
    number of invocations, so the whole run's time is known when it took several (`--force` starts it anew)."""
    path = logs / "time.json"
    ledger = {"invocations": 0, "stages": {}}
    if path.is_file() and not reset:
        try:
            ledger = json.loads(path.read_text())
        except ValueError:
            pass
    ledger["invocations"] += int(invocation)
    if stage is not None:
        ledger["stages"][stage] = round(ledger["stages"].get(stage, 0.0) + seconds, 1)

    logs.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, json.dumps(ledger, indent=2))
    return ledger


def finish(paths: dict, logs: Path, seconds: float, times: dict[str, float]) -> dict:
    """Prints the headline numbers and where the report, TensorBoard logs and checkpoints are."""
    print(f"\npipeline finished in {seconds / 60:.1f} min" + (
        " (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")" if times else " (nothing to do)"))
    ledger = add_time(logs)
    if ledger["invocations"] > 1 or set(ledger["stages"]) - set(times):
        total = sum(ledger["stages"].values())
        print(f"the whole run: {total / 60:.1f} min of stage time over {ledger['invocations']} invocation(s) ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in ledger["stages"].items()) + f"; {logs / 'time.json'})")
    summary_file = paths["report"].parent / "summary.json"
    summary = json.loads(summary_file.read_text()).get("summary", {}) if summary_file.is_file() else {}
    for stage, stats in summary.get("stages", {}).items():
        score = "–" if stats["score_mean"] is None else f"{stats['score_mean']:.3f}"
        print(f"  {stage:5s} mean reward score {score:>7s}   follows template {stats['follows_template']:4.0%}"
              f"   empty {stats.get('empty', 0.0):4.0%}   {stats['response_tokens']:5.1f} tokens")
    for name, value in summary.get("reward_anchors", {}).items():
        print(f"  ({name}: mean reward score {value:.3f})")
    if "rlhf_vs_sft" in summary:
        from alpaca_rlhf.inference.report import _ci

        w = summary["rlhf_vs_sft"]
        print(f"  win rate of RLHF over SFT by the optimised reward model: {w['win_rate']:.1%} "
              f"{_ci(w.get('win_rate_ci95'))} (not evidence by itself)")
        if "judge_win_rate" in w:
            print(f"  by the judge reward model: {w['judge_win_rate']:.1%} {_ci(w.get('judge_win_rate_ci95'))}")
    if summary.get("llm_judge"):
        from alpaca_rlhf.inference.report import llm_judge_lines

        print("\n".join("  " + line for line in llm_judge_lines(summary)))
    if "kl_rlhf_to_sft" in summary:
        print(f"  KL(RLHF || SFT): {summary['kl_rlhf_to_sft']['mean']:.3f} nats per response")
    ppo_export = ppo_final_export(paths["ppo"], logs / f"{paths['rl']}.done.json")
    tensorboard = sorted({str(d.parent) for d in paths["tensorboard"]})
    print(f"report:      {paths['report']} (all outputs: {paths['report'].parent / 'outputs.jsonl'})")
    print(f"TensorBoard: tensorboard --logdir {' --logdir '.join(tensorboard) if tensorboard else '(none)'}  "
          f"(runs: {', '.join(str(d) for d in paths['tensorboard'])})")
    rl = paths.get("rl", "ppo").upper()
    print(f"checkpoints: SFT {paths['sft']}, reward model {paths['rm'] or '(none)'}, {rl} "
          f"{ppo_export or paths['ppo']}")
    print(f"logs:        {logs}/<stage>.log")
    return summary
