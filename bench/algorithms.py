"""PPO, RLOO, GRPO, REINFORCE++ and DPO from the same SmolLM2 SFT model at an equal budget, side by side (CPU, offline).

    python bench/algorithms.py                 # trains what is missing, compares each, prints the table
    python bench/algorithms.py --no-run        # only the table, from the outputs already there
    python bench/algorithms.py --only rloo grpo

Needs the smol SFT model and reward model (`python cli.py pipeline --config configs/smol/pipeline.yaml`, which also
validates the LLM judge in its compare stage). Then, for each method, `python cli.py fit --config
configs/smol/<method>.yaml` in a subprocess (wall time and peak resident memory measured around it), and `python
cli.py compare` of its final export against the SFT model on the split's 64 evaluation prompts (the same prompts,
sampling, seed and one sample per prompt for every method), judged by the LLM judge (another family, trained on
none of the preference labels; validated once by the pipeline's compare) and scored by the reward model the online
methods optimised.

The budget: the online methods generate the same number of completions (8 per iteration x 24 iterations, at most
96 new tokens each) and take the same 96 optimizer steps at the same learning rate, schedule and LoRA; the table
reports the tokens they actually generated. DPO generates nothing: it takes the same 96 optimizer steps on 8
preference pairs each (the split's `dpo` part).

The table is printed and written to `output/smol/algorithms/table.md`; docs/results.md shows it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from blind_read import summary_lines  # noqa: E402
from quality import METHOD_HEADER, judge_lines, method_row, rm_lines, sft_row  # noqa: E402

METHODS = ("ppo", "rloo", "grpo", "reinforce", "dpo")
OUT = Path("output/smol")
SFT = OUT / "lora-alpaca-adapter-merged"
RM = OUT / "reward_model-adapter-merged"
JUDGE = OUT / "judge-adapter-merged"
RESULTS = OUT / "algorithms"

# peak RSS of one child process: run it from a fresh interpreter whose only child it is
_MEASURE = ("import resource, subprocess, sys, time; t = time.time(); code = subprocess.call(sys.argv[1:]); "
            "print('@@', code, time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run_measured(args: list[str], log: Path) -> dict:
    """Runs `python cli.py <args>`; returns exit code, wall seconds and peak RSS (GiB) of that process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, str(ROOT / "cli.py"), *args],
                              stdout=subprocess.PIPE, stderr=f, text=True)
    f_out = proc.stdout.splitlines()
    last = next(line for line in reversed(f_out) if line.startswith("@@"))
    _, code, seconds, rss_kib = last.split()
    with open(log, "a") as f:
        f.write("\n".join(x for x in f_out if not x.startswith("@@")))
    return {"exit": int(code), "seconds": float(seconds), "peak_rss_gib": int(rss_kib) / 2**20}


def export_of(method: str) -> Path | None:
    """The finished output of a method's run: the final `step_<n>` (online) or the adapter folder (DPO)."""
    if method == "dpo":
        folder = OUT / "lora-dpo"
        return folder if (folder / "adapter_model.safetensors").is_file() else None
    finished = [p.parent for p in (OUT / f"{method}_checkpoints").glob("step_*/ppo_state.json")
                if json.loads(p.read_text()).get("finished") is True]
    return max(finished, key=lambda p: int(p.name.split("_")[-1])) if finished else None


def train(method: str) -> dict:
    record_file = RESULTS / f"{method}.train.json"
    if export_of(method) is not None and record_file.is_file():
        return json.loads(record_file.read_text())
    args = ["fit", "--config", f"configs/smol/{method}.yaml"]
    last = OUT / "checkpoints" / method / "last.ckpt"
    if last.is_file():
        args += ["--ckpt_path", "last"]  # an interrupted run resumes (its time and memory are this part's)
    elif method != "dpo":
        args += ["--model.init_args.overwrite_output_dir", "true"]
    print(f"{method}: training ({' '.join(args)}); log {RESULTS / f'{method}.train.log'}", flush=True)
    record = run_measured(args, RESULTS / f"{method}.train.log")
    if record["exit"] != 0:
        raise SystemExit(f"{method}: training failed (exit {record['exit']}); see {RESULTS / f'{method}.train.log'}")
    record_file.write_text(json.dumps(record, indent=2))
    return record


def evaluate(method: str) -> dict:
    report = RESULTS / f"compare_{method}"
    if not (report / "summary.json").is_file():
        args = ["compare", "--config", "configs/smol/compare.yaml", "--base_model", "null", "--sft_model", str(SFT),
                "--rlhf_model", str(export_of(method)), "--reward_model", str(RM), "--samples_per_prompt", "1",
                "--llm_judge_pairs", "0", "--report_dir", str(report)]  # the judge was validated once, by the pipeline
        if (JUDGE / "config.json").is_file():
            args += ["--judge_model", str(JUDGE)]
        print(f"{method}: comparing with SFT; log {RESULTS / f'{method}.compare.log'}", flush=True)
        record = run_measured(args, RESULTS / f"{method}.compare.log")
        if record["exit"] != 0:
            raise SystemExit(f"{method}: compare failed; see {RESULTS / f'{method}.compare.log'}")
    return json.loads((report / "summary.json").read_text())["summary"]


def generated_tokens(method: str) -> int | None:
    """Tokens the method generated in training: the sum over iterations of mean length x completions."""
    if method == "dpo":
        return 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = OUT / method / "run"
    if not run.is_dir():
        return None
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    if "rollout/response_length" not in events.Tags()["scalars"]:
        return None
    completions = 8  # per iteration in every smol online config: 8 prompts x 1 (PPO), 2 prompts x 4 (RLOO, GRPO)
    per_iteration = {e.step: e.value for e in events.Scalars("rollout/response_length")}  # last write per step
    return round(sum(per_iteration.values()) * completions)


def fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def table(results: dict) -> str:
    pipeline = OUT / "compare" / "summary.json"
    validated = json.loads(pipeline.read_text())["summary"].get("llm_judge") if pipeline.is_file() else None
    rm_stats = RM / "reward_stats.json"
    rm_report = json.loads(rm_stats.read_text()).get("accuracy_report") if rm_stats.is_file() else None
    lines = ["**Reward model** (held-out pairs):", "", *rm_lines(rm_report), "", "**LLM judge**:", "",
             *judge_lines(validated), "", *METHOD_HEADER]
    first = next((r["summary"] for r in results.values() if r.get("summary")), None)
    if first:
        lines.append(sft_row(first))
    for method, r in results.items():
        if r.get("summary"):
            lines.append(method_row(method.upper(), r["summary"], r["train"]["seconds"]))
    flags = {m: r["summary"].get("reward_hacking", []) for m, r in results.items() if r.get("summary")}
    lines += [""] + [f"- {m.upper()} reward-hacking flags: " + ("; ".join(f) if f else "none") for m, f in
                     flags.items()]
    lines += [""] + [f"- {m.upper()}: {fmt(r['tokens'], ',')} tokens generated in training, peak RSS "
                     f"{r['train']['peak_rss_gib']:.2f} GiB" for m, r in results.items() if r.get("summary")]
    blind = summary_lines()
    if blind:
        lines += ["", "**Blind read** (bench/blind_read.py: each pair shown as A/B by a seeded coin; the candidate's "
                  "win rate against SFT, ties half):", "", *blind]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="only the table, from the outputs already there")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)
    missing = [str(p) for p in (SFT, RM) if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `python cli.py pipeline --config "
                         "configs/smol/pipeline.yaml` (its sft and rm stages) first")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.only:
        started = time.time()
        if args.no_run:
            record_file = RESULTS / f"{method}.train.json"
            if not record_file.is_file() or not (RESULTS / f"compare_{method}/summary.json").is_file():
                continue
            train_record = json.loads(record_file.read_text())
        else:
            train_record = train(method)
        summary = evaluate(method)
        results[method] = {"train": train_record, "summary": summary, "tokens": generated_tokens(method)}
        print(f"{method}: done ({(time.time() - started) / 60:.1f} min)", flush=True)
    text = table(results)
    print(text)
    (RESULTS / "table.md").write_text(text + "\n")
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {RESULTS / 'table.md'}")
    return results


if __name__ == "__main__":
    main()
