"""The quality table of the recipe on a real model: SmolLM2-135M-Instruct, Alpaca, Anthropic HH (CPU, offline).

    python bench/quality.py                        # runs what is missing of the smol pipeline, then the table
    python bench/quality.py --no-run               # only the table, from the outputs already there

It runs `python cli.py pipeline --config configs/smol/pipeline.yaml` (finished stages are skipped), then reads:
- SFT: the mean token loss on the SFT stage's held-out Alpaca records (its own split), of the base model and of
  the merged SFT model, computed here with the same data module and loss as training;
- the reward model: its held-out accuracy on the split's `heldout` pairs with a 95% interval, beside "prefer the
  shorter / longer / refusal" on the same pairs, overall and per HH subset (its `reward_stats.json`);
- the LLM judge: its agreement with the human labels of held-out pairs (compare's validation);
- PPO against SFT on the split's `eval` prompts: the LLM judge's win / tie / loss with a paired-bootstrap interval,
  the RM's win rate with its interval, KL, length ratio, EOS, refusal and empty rates, wall time, and the 10
  examples compare drew with its seed, with the judge's verdict on each.
The table is printed and written to `<output_dir>/quality.md`; docs/results.md shows it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = {"rm_accuracy": 0.65, "win_rate": 0.60, "kl": 10.0}


def sft_held_out_loss(model_path: str, sft_args: list[str], batch_size: int = 8) -> tuple[float, int]:
    """(mean token NLL, labelled tokens) of a model on the SFT stage's held-out records."""
    import torch

    from alpaca_rlhf.data import AlpacaDataModule
    from alpaca_rlhf.models import ModelSpec, load_causal_lm, load_tokenizer
    from alpaca_rlhf.parsers import parse_fit_config

    config = parse_fit_config(sft_args)
    data_args = dict(config.data.init_args)
    spec = ModelSpec(**{**dict(config.model.init_args.model), "name_or_path": model_path})
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, trainable=False)
    data = AlpacaDataModule(**data_args)
    data.connect(tokenizer)
    data.setup()
    collate = data.collator()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data.val_data), batch_size):
            batch = collate(data.val_data[i : i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count, count


def last_scalar(run_dir: Path, tag: str) -> float | None:
    """The last value of a scalar in a TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir():
        return None
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return None
    return events.Scalars(tag)[-1].value


def fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def rm_lines(report: dict | None) -> list[str]:
    """The reward model's held-out accuracy with its interval beside the length and refusal rules, per subset."""
    if not report:
        return ["(no held-out report in the reward model's reward_stats.json: retrain it with this version)"]
    lines = ["| subset | pairs | RM accuracy [95% CI] | prefer shorter | prefer longer | prefer refusal | margin over "
             "the best rule | goal |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report.items():
        lo, hi = r["ci95"]
        goal = ">= 0.65, " if name == "all" else ""
        ok = r["beats_rules"] and (name != "all" or r["accuracy"] >= GOALS["rm_accuracy"])
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {r['rules']['shorter']:.3f} | "
                     f"{r['rules']['longer']:.3f} | {r['rules']['refusal']:.3f} | {r['margin_over_best_rule']:+.3f} | "
                     f"{goal}+0.07 {'(met)' if ok else '(missed)'} |")
    return lines


def judge_lines(llm: dict | None) -> list[str]:
    if not llm or not llm.get("validation"):
        return ["(no LLM-judge validation: run compare with --llm_judge and prompts.part set)"]
    v = llm["validation"]
    r = v[llm["rule"]]
    lo, hi = r["report"]["all"]["ci95"]
    state = "reliable" if r["reliable"] else "UNRELIABLE (below 0.60): its verdicts below are not evidence"
    lines = [f"LLM judge `{Path(llm['model']).name}` (rule `{llm['rule']}`): agreement with the human labels of "
             f"{v['n']} held-out pairs **{r['agreement']:.3f}** [95% CI {lo:.3f}, {hi:.3f}], ties {r['tie_rate']:.0%}; "
             f"{state}. It picks the reply shown first {v['position_bias']:.0%} of the time.", ""]
    lines += ["| subset | pairs | judge agreement | prefer shorter | prefer longer | prefer refusal |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, sub in r["report"].items():
        lines.append(f"| {name} | {sub['n']} | {sub['accuracy']:.3f} | {sub['rules']['shorter']:.3f} | "
                     f"{sub['rules']['longer']:.3f} | {sub['rules']['refusal']:.3f} |")
    other = "debiased" if llm["rule"] == "both_orders" else "both_orders"
    lines += ["", f"(rule `{other}` on the same pairs: agreement {v[other]['agreement']:.3f}, ties "
                  f"{v[other]['tie_rate']:.0%})"]
    return lines


def win(result: dict | None) -> str:
    if not result:
        return "–"
    lo, hi = result.get("ci95", [None, None])
    return (f"{result['win_rate']:.1%} [{lo:.1%}, {hi:.1%}] ({result['win']}/{result['tie']}/{result['loss']})"
            if lo is not None else f"{result['win_rate']:.1%}")


def method_row(name: str, summary: dict, seconds: float | None) -> str:
    """One method against SFT: LLM judge W/T/L, RM win rate, KL, length ratio, EOS, refusal, empty, wall time."""
    st, sft = summary["stages"]["rlhf"], summary["stages"]["sft"]
    versus, kl = summary.get("rlhf_vs_sft", {}), summary.get("kl_rlhf_to_sft", {})
    llm = (summary.get("llm_judge") or {}).get("rlhf_vs_sft")
    rm = versus.get("by_rm") or ({"win_rate": versus["win_rate"]} if "win_rate" in versus else None)
    ratio = st["response_tokens"] / max(sft["response_tokens"], 1e-9)
    return (f"| {name} | {win(llm)} | {win(rm)} | {fmt(kl.get('mean'), '.2f')} | {ratio:.2f} | "
            f"{st['ended_with_eos']:.0%} | {st.get('refusal', float('nan')):.0%} | {st['empty']:.0%} | "
            f"{'–' if seconds is None else f'{seconds / 60:.1f} min'} |")


METHOD_HEADER = ["| method | LLM judge vs SFT: win rate [95% CI] (W/T/L) | RM win rate vs SFT [95% CI] (W/T/L) | "
                 "KL to SFT (nats) | length / SFT | EOS | refusal | empty | wall time |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def sft_row(summary: dict) -> str:
    sft = summary["stages"]["sft"]
    return (f"| SFT (start) | – | – | 0 | 1.00 ({sft['response_tokens']:.1f} tokens) | {sft['ended_with_eos']:.0%} | "
            f"{sft.get('refusal', float('nan')):.0%} | {sft['empty']:.0%} | – |")


def table(quality: dict) -> str:
    s, cmp = quality["sft"], quality["compare"]
    lines = [f"SFT held-out loss (Alpaca, {s['tokens']} tokens): base {fmt(s['before'])} -> SFT {fmt(s['after'])}",
             "", "**Reward model** on the split's held-out pairs (never trained on):", "",
             *rm_lines(quality["rm_report"]),
             "", "**LLM judge** (another family, trained on none of the preference labels):", "",
             *judge_lines(cmp.get("llm_judge")), "",
             f"**PPO against SFT** on {cmp.get('rlhf_vs_sft', {}).get('n_prompts', '–')} evaluation prompts no stage "
             "trained on:", "", *METHOD_HEADER]
    if cmp.get("stages"):
        lines += [sft_row(cmp), method_row("PPO", cmp, quality.get("ppo_seconds"))]
    by_subset = (cmp.get("llm_judge") or {}).get("rlhf_vs_sft_by_subset", {})
    if by_subset:
        lines += ["", "LLM judge, PPO vs SFT per subset: " + "; ".join(f"{k} {win(v)}" for k, v in by_subset.items())]
    flags = cmp.get("reward_hacking", [])
    lines += ["", "Reward hacking: " + ("; ".join(flags) if flags else "no sign by compare's checks (judge vs RM, "
                                       "length, emptiness, diversity, length-limit hits).")]
    if quality["examples"]:
        lines += ["", f"{len(quality['examples'])} examples drawn with the seed (not picked), with the LLM judge's "
                      "verdict:", "", "| # | prompt | SFT | PPO | LLM judge |", "| --- | --- | --- | --- | --- |"]
        verdicts = {1.0: "PPO better", 0.5: "tie", 0.0: "SFT better", None: "–"}
        for ex in quality["examples"]:
            lines.append(f"| {ex['id']} | {cell(ex['instruction'])} | {cell(ex['sft'])} | {cell(ex['rlhf'])} | "
                         f"{verdicts.get(ex.get('verdict'), ex.get('verdict'))} |")
    return "\n".join(lines)


def cell(text: str, limit: int = 220) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return (text or "*(empty)*").replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smol/pipeline.yaml", help="the pipeline YAML")
    parser.add_argument("--no-run", action="store_true", help="do not run missing pipeline stages")
    parser.add_argument("--examples", type=int, default=10, help="responses shown side by side (drawn by compare "
                        "with its seed)")
    args = parser.parse_args(argv)

    from alpaca_rlhf.cli import cli_main, parse_function_config
    from alpaca_rlhf.parsers import parse_fit_config
    from alpaca_rlhf.pipeline import find_file, plan

    if not args.no_run:
        cli_main(["pipeline", "--config", args.config])
    pipeline = parse_function_config("pipeline", ["--config", str(find_file(args.config))], instantiate=True)
    stages = pipeline.stages
    planned, paths = plan(stages, pipeline.partition)
    by_name = {s.name: s for s in planned}
    output_dir = Path(pipeline.output_dir)
    sft_args = by_name["sft"].args[1:]
    base = str(parse_fit_config(sft_args).model.init_args.model.name_or_path)
    before, tokens = sft_held_out_loss(base, sft_args)
    after, _ = sft_held_out_loss(str(paths["sft"]), sft_args)

    summary_file = paths["report"].parent / "summary.json"
    summary = json.loads(summary_file.read_text())["summary"] if summary_file.is_file() else {}
    examples = []
    outputs = paths["report"].parent / "outputs.jsonl"
    if outputs.is_file():
        rows = [json.loads(line) for line in outputs.read_text().splitlines()]
        first = {(r["prompt_id"], r["stage"]): r for r in rows if r["sample"] == 0}
        for pid in summary.get("examples", [])[: args.examples]:
            if (pid, "sft") in first and (pid, "rlhf") in first:
                examples.append({"id": pid + 1, "instruction": first[(pid, "sft")]["instruction"],
                                 "sft": first[(pid, "sft")]["response"], "rlhf": first[(pid, "rlhf")]["response"],
                                 "verdict": first[(pid, "rlhf")].get("llm_judge_rlhf_vs_sft")})
    rm_stats = Path(paths["rm"], "reward_stats.json") if paths.get("rm") else None
    rm_report = json.loads(rm_stats.read_text()).get("accuracy_report") if rm_stats and rm_stats.is_file() else None
    done = output_dir / "logs" / f"{paths['rl']}.done.json"
    ppo_seconds = json.loads(done.read_text()).get("seconds") if done.is_file() else None
    quality = {"sft": {"before": before, "after": after, "tokens": tokens}, "rm_report": rm_report,
               "compare": summary, "examples": examples, "ppo_seconds": ppo_seconds}
    text = table(quality)
    print(text)
    (output_dir / "quality.md").write_text(text + "\n")
    (output_dir / "quality.json").write_text(json.dumps(quality, indent=2))
    print(f"\nwritten: {output_dir / 'quality.md'}")
    return quality


if __name__ == "__main__":
    main()
