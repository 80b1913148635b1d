"""The quality table of the recipe on a real model: SmolLM2-135M-Instruct, Alpaca, Anthropic HH (CPU, offline).

    python bench/quality.py                        # runs what is missing of the smol pipeline, then the table
    python bench/quality.py --no-run               # only the table, from the outputs already there

It runs `python cli.py pipeline --config configs/smol/pipeline.yaml` (finished stages are skipped), then reads:
- SFT: the mean token loss on the SFT stage's held-out Alpaca records (its own split), of the base model and of
  the merged SFT model, computed here with the same data module and loss as training;
- the reward model and the judge: their held-out HH accuracy, the final `val/accuracy` of their TensorBoard runs
  (300 pairs neither trained on);
- PPO: compare's `summary.json` on PPO's held-out prompts (RM score, judge score, win rate, KL, length, EOS rate,
  the reward-hacking flags) and a few responses side by side from its `outputs.jsonl`.
The table is printed and written to `<output_dir>/quality.md`; the README shows it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = {"rm_accuracy": 0.67, "win_rate": 0.60, "kl": 10.0}


def sft_held_out_loss(model_path: str, sft_args: list[str], batch_size: int = 8) -> tuple[float, int]:
    """(mean token NLL, labelled tokens) of a model on the SFT stage's held-out records."""
    import torch

    from alpaca_rlhf.cli import parse_fit_config
    from alpaca_rlhf.data import AlpacaDataModule
    from alpaca_rlhf.models import ModelSpec, load_causal_lm, load_tokenizer

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


def table(quality: dict) -> str:
    s, rm, judge, cmp = quality["sft"], quality["rm"], quality["judge"], quality["compare"]
    stages = cmp.get("stages", {})
    versus, kl = cmp.get("rlhf_vs_sft", {}), cmp.get("kl_rlhf_to_sft", {})
    rm_ok = rm["accuracy"] is not None and rm["accuracy"] >= GOALS["rm_accuracy"]
    win_ok = versus.get("win_rate", 0) >= GOALS["win_rate"]
    kl_ok = kl.get("mean", float("inf")) <= GOALS["kl"]
    lines = ["| measure | value | goal |", "| --- | --- | --- |",
             f"| SFT held-out loss (Alpaca, {s['tokens']} tokens): base -> SFT | {fmt(s['before'])} -> "
             f"{fmt(s['after'])} | falls |",
             f"| RM held-out accuracy (HH harmless, {rm['pairs']} pairs) | {fmt(rm['accuracy'])} | >= 0.67 "
             f"{'(met)' if rm_ok else '(missed)'} |",
             f"| judge RM held-out accuracy (other half of the pairs) | {fmt(judge['accuracy'])} | |",
             f"| RLHF-over-SFT win rate by the RM ({versus.get('n_prompts', '–')} held-out prompts) | "
             f"{fmt(versus.get('win_rate'), '.1%')} | >= 60% {'(met)' if win_ok else '(missed)'} |",
             f"| RLHF-over-SFT win rate by the judge | {fmt(versus.get('judge_win_rate'), '.1%')} | > 50% |",
             f"| KL(RLHF ‖ SFT) per response | {fmt(kl.get('mean'), '.2f')} nats | <= 10 "
             f"{'(met)' if kl_ok else '(missed)'} |",
             "", "| stage | RM score | judge score | mean length (tokens) | ends with EOS | empty | hits max length "
             "| distinct-2 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, title in (("base", "base"), ("sft", "SFT"), ("rlhf", "RLHF")):
        st = stages.get(name)
        if st:
            lines.append(f"| {title} | {fmt(st['score_mean'])} | {fmt(st.get('judge_mean'))} | "
                         f"{st['response_tokens']:.1f} | {st['ended_with_eos']:.0%} | {st['empty']:.0%} | "
                         f"{st.get('max_length_hit', 0):.0%} | {fmt(st.get('distinct_2'), '.2f')} |")
    flags = cmp.get("reward_hacking", [])
    lines += ["", "Reward hacking: " + ("; ".join(flags) if flags else "no sign by compare's checks (judge vs RM, "
                                       "length, emptiness, diversity, length-limit hits).")]
    if quality["examples"]:
        lines += ["", "| prompt | SFT | RLHF |", "| --- | --- | --- |"]
        for ex in quality["examples"]:
            lines.append(f"| {cell(ex['instruction'])} | {cell(ex['sft'])} | {cell(ex['rlhf'])} |")
    return "\n".join(lines)


def cell(text: str, limit: int = 220) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return (text or "*(empty)*").replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smol/pipeline.yaml", help="the pipeline YAML")
    parser.add_argument("--no-run", action="store_true", help="do not run missing pipeline stages")
    parser.add_argument("--examples", type=int, default=3, help="responses shown side by side")
    args = parser.parse_args(argv)

    from alpaca_rlhf.cli import cli_main, parse_fit_config, parse_function_config
    from alpaca_rlhf.pipeline import find_file, plan

    if not args.no_run:
        cli_main(["pipeline", "--config", args.config])
    pipeline = parse_function_config("pipeline", ["--config", str(find_file(args.config))], instantiate=True)
    stages = pipeline.stages
    planned, paths = plan(stages)
    by_name = {s.name: s for s in planned}
    output_dir = Path(pipeline.output_dir)
    sft_args = by_name["sft"].args[1:]
    base = str(parse_fit_config(sft_args).model.init_args.model.name_or_path)
    before, tokens = sft_held_out_loss(base, sft_args)
    after, _ = sft_held_out_loss(str(paths["sft"]), sft_args)

    def rm_quality(name: str) -> dict:
        stage = by_name.get(name)
        if stage is None:
            return {"accuracy": None, "pairs": None}
        config = parse_fit_config(stage.args[1:])
        logger = config.trainer.logger
        run = Path(logger.init_args.save_dir, logger.init_args.name, str(logger.init_args.version))
        return {"accuracy": last_scalar(run, "val/accuracy"), "pairs": config.data.init_args.val_set_size}

    summary_file = paths["report"].parent / "summary.json"
    summary = json.loads(summary_file.read_text())["summary"] if summary_file.is_file() else {}
    examples = []
    outputs = paths["report"].parent / "outputs.jsonl"
    if outputs.is_file():
        rows = [json.loads(line) for line in outputs.read_text().splitlines()]
        first = {(r["prompt_id"], r["stage"]): r for r in rows if r["sample"] == 0}
        for pid in sorted({r["prompt_id"] for r in rows})[: args.examples]:
            if (pid, "sft") in first and (pid, "rlhf") in first:
                examples.append({"instruction": first[(pid, "sft")]["instruction"],
                                 "sft": first[(pid, "sft")]["response"], "rlhf": first[(pid, "rlhf")]["response"]})
    quality = {"sft": {"before": before, "after": after, "tokens": tokens}, "rm": rm_quality("rm"),
               "judge": rm_quality("judge"), "compare": summary, "examples": examples}
    text = table(quality)
    print(text)
    (output_dir / "quality.md").write_text(text + "\n")
    (output_dir / "quality.json").write_text(json.dumps(quality, indent=2))
    print(f"\nwritten: {output_dir / 'quality.md'}")
    return quality


if __name__ == "__main__":
    main()
