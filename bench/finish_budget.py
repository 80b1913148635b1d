"""How a response budget (`max_new_tokens`) meets a model's answers, and what the reward model pays for them.

    # SFT's answers to 64 `rl` prompts, 2 each, with a budget far above the recipe's (about 9 min on 2 cores)
    alpaca-rlhf compare -c configs/smol/compare.yaml --base_model null --rlhf_model null --prompts.part rl \
        --sampling.max_new_tokens 256 --samples_per_prompt 2 --llm_judge null --report_dir output/smol/budget_sft256
    python bench/finish_budget.py output/smol/budget_sft256/outputs.jsonl --stage sft

It reads compare's `outputs.jsonl` (one or more, made with one budget; rows of one stage) and prints:
- the share of answers that end (EOS within the budget) for each budget up to the one they were generated with:
  the issue's control asks for a budget that at least 90% of SFT's answers finish in;
- the reward model's mean raw score of the finished answers by length, and of the answers cut at the budget
  (scored without an end of turn, as PPO's scorer scores them): the gap is what an answer loses by running out
  of tokens, before `missing_eos_penalty` is subtracted on top.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

BUDGETS = (32, 64, 96, 128, 160, 192, 224, 256)
LENGTH_BINS = ((0, 32), (32, 64), (64, 96), (96, 128), (128, 192), (192, 256))


def read_rows(files: Iterable[str | Path], stage: str) -> list[dict]:
    """The rows of one stage (`sft`, `rlhf`, `base`) from compare's outputs.jsonl files."""
    rows = []
    for file in files:
        for line_no, line in enumerate(Path(file).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"stage", "response_tokens", "ended_with_eos", "score"} - row.keys()
            if missing:
                raise ValueError(f"{file}:{line_no}: not a compare outputs.jsonl row (no {sorted(missing)})")
            if row["stage"] == stage:
                rows.append(row)
    if not rows:
        raise ValueError(f"no rows of stage {stage!r} in {[str(f) for f in files]}")
    budgets = sorted({r["response_tokens"] for r in rows if not r["ended_with_eos"]})
    if len(budgets) > 1:  # a cut answer is exactly as long as its budget; pooled budgets would mislabel the rates
        raise ValueError(f"{[str(f) for f in files]}: answers cut at {budgets} tokens: pool only files made with "
                         "one max_new_tokens")
    return rows


def generated_budget(rows: Sequence[dict]) -> int | None:
    """The budget the answers were generated with (the length of an answer that did not end); None if all ended."""
    cut = [r["response_tokens"] for r in rows if not r["ended_with_eos"]]
    return max(cut) if cut else None


def finish_rates(rows: Sequence[dict], budgets: Iterable[int] = BUDGETS) -> list[tuple[int, float]]:
    """(budget, share of answers that end within it), for the budgets up to the one the rows were made with."""
    limit = generated_budget(rows) or float("inf")  # nothing cut: every answer ends within any larger budget
    return [(b, sum(r["ended_with_eos"] and r["response_tokens"] <= b for r in rows) / len(rows))
            for b in budgets if b <= limit]


def score_by_length(rows: Sequence[dict],
                    bins: Iterable[tuple[int, int]] = LENGTH_BINS) -> list[tuple[str, int, float]]:
    """(label, n, mean RM score) of finished answers per length bin (lo, hi], then of the answers cut short."""
    finished = [r for r in rows if r["ended_with_eos"]]
    out = []
    for lo, hi in bins:
        scores = [r["score"] for r in finished if lo < r["response_tokens"] <= hi]
        if scores:
            out.append((f"finished, {lo + 1}-{hi} tokens", len(scores), statistics.fmean(scores)))
    cut = [r["score"] for r in rows if not r["ended_with_eos"]]
    if cut:
        out.append((f"cut at {generated_budget(rows)} tokens", len(cut), statistics.fmean(cut)))
    return out


def report(rows: Sequence[dict]) -> str:
    budget = generated_budget(rows)
    made = f"generated with a budget of {budget} new tokens" if budget else "none cut short"
    lines = [f"{len(rows)} answers, {made}", "",
             "| budget (new tokens) | answers that end within it |", "| --- | --- |"]
    lines += [f"| {b} | {share:.0%} |" for b, share in finish_rates(rows)]
    lines += ["", "| answers | n | mean RM score (raw) |", "| --- | --- | --- |"]
    lines += [f"| {label} | {n} | {mean:.3f} |" for label, n, mean in score_by_length(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="compare's outputs.jsonl (several are pooled)")
    parser.add_argument("--stage", default="sft", help="sft, rlhf or base")
    args = parser.parse_args(argv)
    print(report(read_rows(args.outputs, args.stage)))


if __name__ == "__main__":
    main()
