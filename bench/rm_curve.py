"""The reward model's learning curve on the real HH mix: held-out accuracy against pairs seen, per subset, beside
the best length / refusal rule on the same pairs (SmolLM2-135M SFT model, CPU, offline).

    python bench/rm_curve.py                              # 240 steps of 8 pairs, validated every 60 (~50 min, 2 cores)
    python bench/rm_curve.py --steps 400 --every 100 --lr 3e-4
    python bench/rm_curve.py --no-run                     # only the table, from the last run's TensorBoard file

It trains `configs/smol/rm.yaml` as it is, except: the whole `rm` part of the split (no `train_part`), `--steps`
optimizer steps with validation on the same 300 `heldout` pairs every `--every` steps, and its own output folder
(`output/smol/rm_curve/<name>`), so the pipeline's reward model is left alone. The table is read back from the
run's TensorBoard event file (`val/accuracy`, `val/accuracy_ci_*`, `val_subset/<subset>/*`), printed and written
to `<folder>/curve.md`. It answers "would more data or steps make this RM beat the length rule?" with figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from alpaca_rlhf.parsers import stacked_yaml  # noqa: E402


def curve_config(base: Path, out: Path, steps: int, every: int, lr: float | None) -> dict:
    config = yaml.safe_load(stacked_yaml(base.read_text(), base))  # written elsewhere: its `_base_` resolved
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=every)
    trainer["logger"]["init_args"].update(save_dir=str(out), name="tb", version="run")
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(dirpath=str(out / "checkpoints"), every_n_train_steps=every)
    model = config["model"]["init_args"]
    model["output_dir"] = str(out / "reward_model")
    if lr is not None:
        model["optimizer"]["init_args"]["lr"] = lr
    config["data"]["init_args"].pop("train_part", None)
    return config


def read_curve(event_dir: Path) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(("val/accuracy", "val_subset/"))]
    rows: dict[int, dict] = {}
    for tag in tags:
        for event in acc.Scalars(tag):
            rows.setdefault(event.step, {"step": event.step})[tag] = event.value
    return [rows[s] for s in sorted(rows)]


def format_curve(rows: list[dict], batch_size: int) -> list[str]:
    subsets = sorted({t.split("/")[1] for r in rows for t in r if t.startswith("val_subset/")})
    head = ["step", "pairs seen", "accuracy [95% CI]", "over best rule"] + [f"{s} (over rule)" for s in subsets]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if "val/accuracy" not in r:
            continue
        steps = r["step"] + 1  # Lightning logs a validation inside the epoch at the step before it
        cells = [str(steps), str(steps * batch_size),
                 f"{r['val/accuracy']:.3f} [{r.get('val/accuracy_ci_low', float('nan')):.3f}, "
                 f"{r.get('val/accuracy_ci_high', float('nan')):.3f}]",
                 f"{r.get('val/accuracy_over_best_rule', float('nan')):+.3f}"]
        for s in subsets:
            a, m = r.get(f"val_subset/{s}/accuracy"), r.get(f"val_subset/{s}/over_best_rule")
            cells.append("-" if a is None else f"{a:.3f} ({m:+.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", default="configs/smol/rm.yaml")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None, help="the optimizer's peak LR (default: the config's)")
    parser.add_argument("--name", default=None, help="the run's folder under output/smol/rm_curve")
    parser.add_argument("--no-run", action="store_true", help="only read the table of a finished run")
    args = parser.parse_args(argv)
    name = args.name or f"steps{args.steps}" + (f"_lr{args.lr:g}" if args.lr else "")
    out = ROOT / "output" / "smol" / "rm_curve" / name
    base = (ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    config = curve_config(base, out, args.steps, args.every, args.lr)
    if not args.no_run:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "rm_curve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        done = subprocess.run([sys.executable, "cli.py", "fit", "--config", str(path)], cwd=ROOT)
        if done.returncode:
            return done.returncode
    rows = read_curve(out / "tb" / "run")
    if not rows:
        print(f"no validation points in {out / 'tb' / 'run'}", file=sys.stderr)
        return 1
    lr = config["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    lines = [f"RM learning curve: {args.config}, whole `rm` part, {args.steps} steps, LR {lr:g}, validated on the "
             "`heldout` pairs", "", *format_curve(rows, config["data"]["init_args"]["batch_size"])]
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
