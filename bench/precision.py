"""bf16-mixed against fp32 on the CPU, per stage, at the SmolLM2-135M shape (real weights, vocabulary 49,152).

Each stage runs its own benchmark worker (our side of bench/sft.py, bench/rm.py and bench/ppo.py: the same
module, data, LoRA and optimizer) twice in fresh processes, once under Lightning's `32-true` and once under
`bf16-mixed` (CPU autocast to bfloat16; weights, LoRA, optimizer state and the value/score heads stay fp32),
then once more each for memory (training's peak RSS over what the loaded model and data hold; see
bench/common.py). The smol configs train under `bf16-mixed` because of this table.

    python bench/precision.py                          # sft, rm, ppo at smol: ~15 minutes on 2 CPU cores
    python bench/precision.py --stages sft --size tiny --steps 3
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppo as ppo_bench  # noqa: E402
import rm as rm_bench  # noqa: E402
import sft as sft_bench  # noqa: E402
from common import build_bases, device_description, quiet, run_isolated, tiny_config  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")
SMOL_LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # configs/smol/sft.yaml, rm.yaml


def workers(stage: str, path: str, root: str, steps: int, warmup: int, lora: dict | None) -> tuple:
    """(worker, its kwargs, the throughput key and its unit) of one stage."""
    if stage == "sft":
        d = tiny_config()
        kw = dict(path=path, lora=lora or d["lora"], lr=d["lr"], batch_size=d["batch_size"],
                  max_length=d["max_length"], seed=d["seed"], warmup=warmup, steps=steps)
        return sft_bench.run_ours, kw, "tokens_per_s", "tok/s"
    if stage == "rm":
        d = rm_bench.rm_config()
        kw = dict(path=path, lora=lora or d["lora"], lr=d["lr"], batch_size=d["batch_size"],
                  max_length=d["max_length"], seed=d["seed"], warmup=warmup, steps=steps)
        return rm_bench.run_ours, kw, "pairs_per_s", "pairs/s"
    cfg = ppo_bench.ppo_config()
    if lora:
        cfg["lora"] = {**lora, "r": 8, "alpha": 16}  # configs/smol/ppo.yaml: r 8 on all linear layers
    rm_path = ppo_bench.build_reward_model(path, Path(root, "rm"))
    kw = dict(path=path, rm_path=rm_path, cfg=cfg, batch_size=8, max_prompt_length=64, warmup=warmup, steps=steps)
    return ppo_bench.run_ours, kw, "episodes_per_s", "episodes/s"


def _mib(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"  # NaN: no memory run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stages", default="sft,rm,ppo", help="comma-separated: sft, rm, ppo")
    parser.add_argument("--size", default="smol", choices=["tiny", "25M", "smol"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (PPO: iterations) per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0: torch's choice")
    parser.add_argument("--no-memory-run", action="store_true")
    args = parser.parse_args(argv)
    quiet()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    threads = args.threads or None
    load_before, started = os.getloadavg()[0], time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_bases([args.size], tmp)[args.size]["path"]
        lora = SMOL_LORA if args.size == "smol" else None
        for stage in stages:
            fn, kw, key, unit = workers(stage, path, tmp, args.steps, args.warmup, lora)
            row = {"stage": stage, "unit": unit}
            for precision in PRECISIONS:
                run = functools.partial(fn, precision=precision)
                res = run_isolated(run, threads=threads, **kw)
                mem = None if args.no_memory_run else run_isolated(run, threads=threads, live_memory=True, **kw)
                row[precision] = {"speed": res[key], "train_mib": mem["train_rss_mib"] if mem else float("nan"),
                                  "peak_mib": res["peak_rss_mib"]}
                print(f"  {stage} {precision}: {res[key]:.2f} {unit}, training adds "
                      f"{row[precision]['train_mib']:.0f} MiB", flush=True)
            rows.append(row)
    print(f"\nbf16-mixed / fp32 per stage at {args.size} on {device_description(threads)}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per run, one run each; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {time.perf_counter() - started:.0f} s in all.\n")
    print("| stage | fp32 | bf16-mixed | speed bf16/fp32 | training MiB fp32 / bf16 | peak RSS MiB fp32 / bf16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["32-true"], r["bf16-mixed"]
        print(f"| {r['stage']} | {a['speed']:,.2f} {r['unit']} | {b['speed']:,.2f} {r['unit']} | "
              f"**{b['speed'] / a['speed']:.2f}** | {_mib(a['train_mib'])} / {_mib(b['train_mib'])} | "
              f"{a['peak_mib']:,.0f} / {b['peak_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
