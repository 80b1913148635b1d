"""PPO, RLOO, GRPO and DPO from the same SmolLM2 SFT model at an equal budget, side by side (CPU, offline).

    python bench/algorithms.py                 # trains what is missing, compares each, prints the table
    python bench/algorithms.py --no-run        # only the table, from the outputs already there
    python bench/algorithms.py --only rloo grpo

Needs the smol SFT model, reward model and judge (`python cli.py pipeline --config configs/smol/pipeline.yaml`,
or its sft/rm/judge stages). Then, for each method, `python cli.py fit --config configs/smol/<method>.yaml` in a
subprocess (wall time and peak resident memory measured around it), and `python cli.py compare` of its final
export against the SFT model on PPO's 64 held-out HH prompts (the same split, sampling, seed and one sample per
prompt for every method: CPU time), scored by the reward model the online methods optimised and by the judge (a second
RM on the other half of the pairs, which none of them saw).

The budget: the online methods generate the same number of completions (8 per iteration x 24 iterations, at most
48 new tokens each) and take the same 96 optimizer steps at the same learning rate and LoRA; the table reports
the tokens they actually generated. DPO generates nothing: it takes the same 96 optimizer steps on 8 preference
pairs each (the RM's half of HH harmless).

The table is printed and written to `output/smol/algorithms/table.md`; the README shows it.
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

METHODS = ("ppo", "rloo", "grpo", "dpo")
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
                "--rlhf_model", str(export_of(method)), "--reward_model", str(RM), "--judge_model", str(JUDGE),
                "--samples_per_prompt", "1", "--report_dir", str(report)]
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
    lines = ["| method | RM score | judge score | win rate vs SFT (RM / judge) | KL to SFT (nats) | length (tokens) | "
             "EOS | empty | tokens generated in training | wall time | peak RSS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    sft = next((r["summary"]["stages"]["sft"] for r in results.values() if r.get("summary")), None)
    if sft:
        lines.append(f"| SFT (start) | {fmt(sft['score_mean'])} | {fmt(sft.get('judge_mean'))} | – | 0 | "
                     f"{sft['response_tokens']:.1f} | {sft['ended_with_eos']:.0%} | {sft['empty']:.0%} | – | – | – |")
    for method, r in results.items():
        s = r.get("summary")
        if not s:
            continue
        st, vs, kl, tr = s["stages"]["rlhf"], s.get("rlhf_vs_sft", {}), s.get("kl_rlhf_to_sft", {}), r["train"]
        lines.append(
            f"| {method.upper()} | {fmt(st['score_mean'])} | {fmt(st.get('judge_mean'))} | "
            f"{fmt(vs.get('win_rate'), '.1%')} / {fmt(vs.get('judge_win_rate'), '.1%')} | "
            f"{fmt(kl.get('mean'), '.2f')} | "
            f"{st['response_tokens']:.1f} | {st['ended_with_eos']:.0%} | {st['empty']:.0%} | {fmt(r['tokens'], ',')} | "
            f"{tr['seconds'] / 60:.1f} min | {tr['peak_rss_gib']:.2f} GiB |")
    flags = {m: r["summary"].get("reward_hacking", []) for m, r in results.items() if r.get("summary")}
    lines += [""] + [f"- {m.upper()} reward-hacking flags: " + ("; ".join(f) if f else "none") for m, f in
                     flags.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="only the table, from the outputs already there")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)
    missing = [str(p) for p in (SFT, RM, JUDGE) if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `python cli.py pipeline --config "
                         "configs/smol/pipeline.yaml` (its sft, rm and judge stages) first")
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
