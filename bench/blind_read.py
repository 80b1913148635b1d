"""A blind pairwise read: a reader (a person, or any judge that can read a text file) is first validated on
held-out HH pairs with human labels, then reads two models' answers to the evaluation prompts, never told which
answer is which.

    python bench/blind_read.py sheet heldout --name heldout                  # held-out HH pairs 1-60 of 120
    python bench/blind_read.py sheet heldout --name heldout2 --offset 60     # and 61-120
    python bench/blind_read.py sheet compare --name ppo \\
        --outputs output/smol/compare/outputs.jsonl --baseline sft --candidate rlhf
    # read docs/blind/<name>.sheet.md and write docs/blind/<name>.verdicts.txt: one line per item, "<id> A|B|tie"
    python bench/blind_read.py score --name heldout heldout2                 # agreement with the human labels
    python bench/blind_read.py score --name ppo                              # candidate's win / tie / loss

`sheet` writes the items in a seeded order, each answer shown as A or B by a seeded coin, and keeps which is
which in `<name>.key.json`: the reader opens the sheet and never the key. The held-out pairs are the ones
`alpaca-rlhf judge` validates LLM judges on (the partition's `heldout` part, same draw), so a reader and an LLM
judge are measured on the same labels. `score` prints the agreement with the human labels (Wilson 95% interval),
overall and per subset, beside "prefer the shorter / longer / refusal", or the candidate's win / tie / loss
against the baseline with a paired-bootstrap 95% interval. A reader below 0.60 agreement is not evidence.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alpaca_rlhf.evaluation import (  # noqa: E402  (after the path insert)
    UNRELIABLE_JUDGE,
    accuracy_report,
    format_accuracy_report,
    format_win_rate,
    win_tie_loss,
)

DATA = [str(ROOT.parent / "shared/data/hh-rlhf-harmless"), str(ROOT.parent / "shared/data/hh-rlhf-helpful")]
DIR = ROOT / "docs" / "blind"
VERDICTS = {"a": "A", "b": "B", "tie": "tie"}
SCORED = ("good", "candidate")  # the side a verdict is scored for: the human label's choice, or the candidate model


def scored_side(key: dict) -> str:
    """The side of a sheet's key that its verdicts are scored for (held-out sheets: "good")."""
    return key["first"] if key["first"] in SCORED else key["second"]


def heldout_items(offset: int, n: int, draw: int = 120) -> list[dict]:
    """Pairs `offset` to `offset + n` of the `draw` held-out pairs `alpaca-rlhf judge --pairs 120` validates LLM
    judges on (same function and seed; the draw keeps the files' order, so read all of it)."""
    from alpaca_rlhf.inference.judge import heldout_pairs

    pairs = heldout_pairs(DATA, n=draw)[offset : offset + n]
    return [{"context": p["conversation"], "good": p["chosen"], "bad": p["rejected"], "subset": p["subset"]}
            for p in pairs]


def compare_items(outputs: Path, baseline: str, candidate: str) -> list[dict]:
    """One item per (prompt, sample) that both stages answered in compare's `outputs.jsonl`."""
    rows = [json.loads(line) for line in outputs.read_text().splitlines() if line.strip()]
    by = {(r["prompt_id"], r["sample"], r["stage"]): r for r in rows}
    items = []
    for (pid, sample, stage), r in sorted(by.items()):
        if stage != baseline or (pid, sample, candidate) not in by:
            continue
        context = (r.get("input") or "").replace("Human:", "User:").strip()
        items.append({"context": (context + "\n" if context else "") + f"User: {r['instruction']}",
                      "baseline": r["response"], "candidate": by[(pid, sample, candidate)]["response"],
                      "prompt_id": pid, "sample": sample})
    return items


def write_sheet(items: list[dict], name: str, first: str, second: str, seed: int, note: str,
                folder: Path = DIR) -> None:
    """The sheet (no labels) and the key; `first` / `second` are the item keys a coin puts behind A and B."""
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    lines = [f"# Blind read: {name}", "", note, "",
             "For each item write one line `<id> A`, `<id> B` or `<id> tie` in "
             f"`{name}.verdicts.txt`: which reply is better for the user (helpful, honest and harmless). "
             "Do not open the key.", ""]
    key = []
    for number, i in enumerate(order, 1):
        item = items[i]
        swap = rng.random() < 0.5
        a, b = (item[second], item[first]) if swap else (item[first], item[second])
        key.append({"id": number, "A": second if swap else first, **item})
        lines += [f"## {number}", "", "```text", item["context"].strip(), "```", "", "**A**", "", "```text",
                  a.strip() or "(empty)", "```", "", "**B**", "", "```text", b.strip() or "(empty)", "```", ""]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.sheet.md").write_text("\n".join(lines))
    (folder / f"{name}.key.json").write_text(json.dumps({"first": first, "second": second, "items": key}, indent=1))
    print(f"{len(items)} items: {folder / f'{name}.sheet.md'} (key {folder / f'{name}.key.json'})")


def read_verdicts(path: Path, n: int) -> dict[int, str]:
    verdicts = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit() or fields[1].lower() not in VERDICTS:
            raise SystemExit(f"{path}: line {number}: expected '<id> A|B|tie', got {line!r}")
        verdicts[int(fields[0])] = VERDICTS[fields[1].lower()]
    missing = sorted(set(range(1, n + 1)) - set(verdicts))
    if missing:
        raise SystemExit(f"{path}: no verdict for item(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return verdicts


def outcome(verdict: str, letter_of_side: str) -> float:
    """1 if the verdict picks the side shown as `letter_of_side`, 0 if the other, 0.5 on a tie."""
    return 0.5 if verdict == "tie" else float(verdict == letter_of_side)


def score(names: list[str], folder: Path = DIR, quiet: bool = False) -> dict:
    """The verdicts of one or more sheets of the same kind, read together."""
    say = (lambda *_: None) if quiet else print
    items, verdicts, sides = [], {}, set()
    for sheet in names:
        key = json.loads((folder / f"{sheet}.key.json").read_text())
        read = read_verdicts(folder / f"{sheet}.verdicts.txt", len(key["items"]))
        sides.add(scored_side(key))
        for it in key["items"]:
            verdicts[len(items) + 1] = read[it["id"]]
            items.append({**it, "id": len(items) + 1})
    if len(sides) != 1:
        raise SystemExit(f"{names}: sheets of different kinds (held-out pairs, model answers) cannot be read together")
    side, name = sides.pop(), " + ".join(names)
    outcomes = [outcome(verdicts[it["id"]], "A" if it["A"] == side else "B") for it in items]
    if side == "good":
        report = accuracy_report(outcomes, [it["good"] for it in items], [it["bad"] for it in items],
                                 [it["subset"] for it in items])
        agreement = report["all"]["accuracy"]
        verdict = "reliable" if agreement >= UNRELIABLE_JUDGE else f"UNRELIABLE (below {UNRELIABLE_JUDGE:.2f})"
        say(f"{name}: agreement with the human labels on {len(items)} held-out pairs (ties half): {verdict}")
        say("\n".join(format_accuracy_report(report, "agreement")))
        first_pick = sum(1 for it in items if verdicts[it["id"]] == "A") / len(items)
        say(f"picked the reply shown as A {first_pick:.0%} of the time; ties "
              f"{sum(1 for v in verdicts.values() if v == 'tie') / len(items):.0%}")
        return {"agreement": agreement, "reliable": agreement >= UNRELIABLE_JUDGE, "report": report,
                "a_rate": first_pick}
    per_prompt: dict = {}  # sheets of the same prompts (another sampling seed) are paired: a prompt's mean outcome
    for it, o in zip(items, outcomes, strict=True):
        per_prompt.setdefault(it["prompt_id"], []).append(o)
    result = win_tie_loss([sum(v) / len(v) for v in per_prompt.values()])
    say(f"{name}: the candidate against the baseline, blind: {format_win_rate(result)}"
        + (f" over {len(per_prompt)} prompts, {len(items)} answers" if len(per_prompt) < len(items) else ""))
    for it in items:
        it["outcome"] = outcomes[it["id"] - 1]
    return {**result, "items": items}


def summary_lines(folder: Path = DIR) -> list[str]:
    """One line for the reader's validation (every held-out sheet read) and one per answered model sheet: what
    bench/algorithms.py prints beside its table. Empty when nothing has been read."""
    read = sorted(p.name.removesuffix(".verdicts.txt") for p in folder.glob("*.verdicts.txt"))
    heldout = [n for n in read if scored_side(json.loads((folder / f"{n}.key.json").read_text())) == "good"]
    lines = []
    if heldout:
        v = score(heldout, folder, quiet=True)
        lo, hi = v["report"]["all"]["ci95"]
        rule = v["report"]["all"]["best_rule"]
        lines.append(f"- the reader, on {v['report']['all']['n']} held-out HH pairs: agreement {v['agreement']:.3f} "
                     f"[95% CI {lo:.3f}, {hi:.3f}] (prefer the {rule}: {v['report']['all']['rules'][rule]:.3f}); "
                     + ("reliable" if v["reliable"] else "UNRELIABLE: not evidence"))
    reads: dict[str, list[str]] = {}
    for n in read:
        if n not in heldout:
            lines.append(f"- {n}: {format_win_rate(score([n], folder, quiet=True))}")
            reads.setdefault(model_of(n), []).append(n)
    for model, names in reads.items():
        if len(names) > 1:  # the figure to quote for a model read more than once
            lines.append(f"- {model}, {len(names)} reads paired by prompt: "
                         f"{format_win_rate(score(names, folder, quiet=True))}")
    return lines


def model_of(name: str) -> str:
    """The model a compare sheet reads: its name without the seeds (`ppo_lam1_trainseed7_seed79` -> `ppo_lam1`)."""
    return re.sub(r"(_trainseed\d+)?(_seed\d+)?$", "", name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sheet = sub.add_parser("sheet")
    sheet.add_argument("kind", choices=["heldout", "compare"])
    sheet.add_argument("--name", required=True)
    sheet.add_argument("--n", type=int, default=60, help="held-out pairs to read (of the judge's 120-pair draw)")
    sheet.add_argument("--offset", type=int, default=0, help="where in that draw to start")
    sheet.add_argument("--outputs", type=Path, help="compare's outputs.jsonl")
    sheet.add_argument("--baseline", default="sft")
    sheet.add_argument("--candidate", default="rlhf")
    sheet.add_argument("--seed", type=int, default=7)
    scorer = sub.add_parser("score")
    scorer.add_argument("--name", required=True, nargs="+", help="one sheet, or several of one kind read together")
    for p in (sheet, scorer):
        p.add_argument("--dir", type=Path, default=DIR, help="where the sheets, keys and verdicts are")
    args = parser.parse_args(argv)
    if args.command == "score":
        score(args.name, args.dir)
    elif args.kind == "heldout":
        write_sheet(heldout_items(args.offset, args.n), args.name, "good", "bad", args.seed,
                    "Held-out HH pairs (the partition's `heldout` part), with human labels in the key.", args.dir)
    else:
        if args.outputs is None:
            parser.error("sheet compare needs --outputs (compare's outputs.jsonl)")
        write_sheet(compare_items(args.outputs, args.baseline, args.candidate), args.name, "baseline", "candidate",
                    args.seed, f"Answers of two models to the evaluation prompts ({args.outputs}).", args.dir)


if __name__ == "__main__":
    main()
