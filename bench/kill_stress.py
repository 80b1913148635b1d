"""Kill -9 at random moments, resume with `--ckpt_path last`, and compare with an uninterrupted run, for every stage.

    python bench/kill_stress.py                         # 9 trials per stage (54 in all), about an hour on 2 cores
    python bench/kill_stress.py --stages ppo dpo --trials 3 --load 1

Every stage runs the tiny config through the real `python cli.py fit` (a subprocess, killed with SIGKILL on its
process group): SFT, RM and DPO for 48 optimizer steps with a checkpoint every 4; PPO, RLOO and GRPO for 3
iterations (24 optimizer steps) with a checkpoint and a `step_<n>` export after every iteration, scored by a
token rule (no reward model needed). A trial kills the run 1 to `--max-kills` times, each at a moment drawn
uniformly between `--low` and `--high` of the training part of the uninterrupted run (from a little before its
first checkpoint to its end: start-up is most of a tiny run), so the kill lands in a step, a checkpoint write or
an export; the clock of the killed run is scaled by when it wrote its own first checkpoint, so a loaded run is
killed at the same point of its work, resumes after each kill with `--ckpt_path last` (Lightning starts
over when no checkpoint was written yet), and finally compares the exported adapter with the uninterrupted run's,
tensor by tensor. `--load N` keeps N busy-loop processes running during every other trial, the first included
(a loaded machine).

It prints one line per trial (kills that landed, the step of `last.ckpt` after each, partial files left by a
kill mid-write, equal or not) and a summary "N of N equal", and writes them to `<work>/kill_stress.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGED_SFT = "output/tiny/lora-alpaca-adapter-merged"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "1000", "--trainer.logger", "false"]
SCORER = json.dumps({"class_path": "alpaca_rlhf.modules.scorers.TokenIdScorer",
                     "init_args": {"token_ids": list(range(40, 200))}})
ONLINE = ("ppo", "rloo", "grpo")


def _stage(name: str) -> tuple:
    """(config, checkpoint folder, optimizer steps per checkpoint, max_steps, the export flag, the final file):
    the offline stages train 48 steps with a checkpoint every 4; the online ones 3 iterations of 8 steps."""
    if name in ONLINE:
        return (f"configs/tiny/{name}.yaml", f"output/tiny/checkpoints/{name}", 8, 24, "--model.init_args.output_dir",
                "step_3/adapter_model.safetensors")
    return (f"configs/tiny/{name}.yaml", f"output/tiny/checkpoints/{name}", 4, 48, "--model.init_args.output_dir",
            "adapter_model.safetensors")


STAGES = {name: _stage(name) for name in ("sft", "rm", "dpo", "ppo", "rloo", "grpo")}


def checkpoint_yaml(ckpt_dir: str, every: int) -> str:
    return f"""
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, filename: "step{{step}}", auto_insert_metric_name: false,
                  every_n_train_steps: {every}, save_top_k: 1, save_last: true}}
"""


def fit_command(stage: str, out: str, resume: bool) -> list[str]:
    config, _, _, max_steps, out_flag, _ = STAGES[stage]
    args = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / config), "--config",
            f"ckpt_{stage}.yaml", *QUIET, "--trainer.max_steps", str(max_steps), out_flag, out]
    if stage in ONLINE:
        args += ["--model.init_args.scorer", SCORER, "--model.init_args.save_freq", "1"]
    return args + (["--ckpt_path", "last"] if resume else [])


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def prepare(work: Path) -> None:
    """The tiny base, and the merged tiny SFT model the later stages start from (built once)."""
    if (work / MERGED_SFT / "config.json").is_file():
        return
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs/tiny/sft.yaml"),
                    *QUIET, "--trainer.max_steps", "20"], cwd=work, env=environment(), check=True,
                   capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "merge", "--adapter_path", "output/tiny/lora-alpaca"],
                   cwd=work, env=environment(), check=True, capture_output=True)


def run(stage: str, work: Path, out: str, resume: bool, kill_at: float | None = None,
        first: float | None = None) -> tuple[bool, float, float | None]:
    """(killed, seconds, when this run wrote its first checkpoint). Runs one fit. With `kill_at` (seconds into
    the uninterrupted run, whose first checkpoint came at `first` s), SIGKILLs its process group at the same
    point of this run: the clock is scaled by how late this run's first new checkpoint came, so a loaded or a
    resumed run is killed at the same stage of its work."""
    launched, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(fit_command(stage, out, resume), cwd=work, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    folder = work / STAGES[stage][1]
    seen = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if seen is None and any(p.stat().st_mtime >= launched for p in folder.glob("*.ckpt") if p.exists()):
            seen = now
        if kill_at is not None and seen is not None:
            scale = seen / first if first else 1.0
            if now >= kill_at * scale:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                proc.stderr.close()
                return True, now, seen
        time.sleep(0.02)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} run failed ({proc.returncode}):\n{err[-4000:]}")
    return False, time.monotonic() - t0, seen


def last_step(work: Path, stage: str) -> int | None:
    import torch

    path = work / STAGES[stage][1] / "last.ckpt"
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def partial_files(work: Path, stage: str) -> list[str]:
    folders = [work / STAGES[stage][1]]
    return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir() if ".tmp-" in p.name)


def compare(a: Path, b: Path) -> float:
    """The largest absolute difference between two adapters' tensors (inf when their keys differ)."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


class Burner:
    """N busy-loop processes: a loaded machine."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def stress(stages: list[str], trials: int, work: Path, seed: int = 0, low: float = 0.0, high: float = 1.0,
           max_kills: int = 2, load: int = 0, tolerance: float = 0.0, log=print) -> list[dict]:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    results = []
    for stage in stages:
        _, ckpt_dir, every, *_ , export = STAGES[stage]
        (work / f"ckpt_{stage}.yaml").write_text(checkpoint_yaml(ckpt_dir, every))
        shutil.rmtree(work / ckpt_dir, ignore_errors=True)
        _, wall, first = run(stage, work, f"straight_{stage}", resume=False)
        # the kills land in the training part of the run (start-up is most of a tiny run): from a little before
        # the first checkpoint (one checkpoint interval of steps) to the end, export included
        start = 0.8 * first if first is not None else 0.0
        log(f"{stage}: uninterrupted run {wall:.1f} s, first checkpoint at {first or float('nan'):.1f} s")
        for trial in range(trials):
            loaded = load > 0 and trial % 2 == 0
            burner = Burner(load) if loaded else None
            out = f"trial_{stage}_{trial}"
            shutil.rmtree(work / ckpt_dir, ignore_errors=True)
            shutil.rmtree(work / out, ignore_errors=True)
            kills, resume = [], False
            try:
                for _ in range(rng.randint(1, max_kills)):
                    when = start + rng.uniform(low, high) * (wall - start)
                    killed, _, _ = run(stage, work, out, resume, kill_at=when, first=first)
                    kills.append({"at_s": round(when, 2), "landed": killed, "last_step": last_step(work, stage),
                                  "partial": partial_files(work, stage)})
                    resume = True  # as a user would: --ckpt_path last (Lightning starts over when none was written)
                    if not killed:
                        break
                run(stage, work, out, resume)
            finally:
                if burner:
                    burner.stop()
            diff = compare(work / f"straight_{stage}" / export, work / out / export)
            row = {"stage": stage, "trial": trial, "loaded": loaded, "kills": kills, "max_abs_diff": diff,
                   "equal": diff <= tolerance}
            results.append(row)
            landed = [f"{k['at_s']}s->step {k['last_step']}" + (f" partial {k['partial']}" if k["partial"] else "")
                      for k in kills if k["landed"]]
            log(f"  trial {trial}{' (loaded)' if loaded else ''}: kills {landed or 'none landed'}; "
                f"{'EQUAL' if row['equal'] else 'DIFFERENT'} (max |diff| {diff:.3g})")
            shutil.rmtree(work / out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--trials", type=int, default=9, help="trials per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--low", type=float, default=0.0, help="earliest kill, a fraction of the training part")
    parser.add_argument("--high", type=float, default=0.9, help="latest kill, a fraction of the training part")
    parser.add_argument("--max-kills", type=int, default=2, help="kills per trial: 1 to this many")
    parser.add_argument("--load", type=int, default=1, help="busy-loop processes during every other trial")
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kill_stress_"))
    t0 = time.time()
    results = stress(args.stages, args.trials, work, args.seed, args.low, args.high, args.max_kills, args.load)
    equal = sum(r["equal"] for r in results)
    landed = sum(k["landed"] for r in results for k in r["kills"])
    print(f"{equal} of {len(results)} equal ({landed} kills landed; {time.time() - t0:.0f} s); work folder {work}")
    (work / "kill_stress.json").write_text(json.dumps(results, indent=1))
    return 0 if equal == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
