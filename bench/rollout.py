"""Faster rollouts: the generation paths of an online RL iteration side by side, on the product's own code.

Each variant is a `GenerationHParams` setting of `PPOModule` (the same code RLOO and GRPO use):
- `dynamic`: transformers' dynamic KV cache, the adapter as separate LoRA matmuls (the default);
- `static`: a preallocated KV cache (`cache_implementation: static`);
- `static+compile`: that cache with the decoding step under `torch.compile` (`compile: true`);
- `merged`: the LoRA weights folded into the base for generation, unfolded after (`merge_adapter: true`);
- `merged+static+compile`: both.

Every variant runs in a fresh process on the same model (default: the real SmolLM2-135M-Instruct from
../shared/models, LoRA r 8 on all linear layers as configs/smol/ppo.yaml, its B matrices set to small seeded
random values as after training, so that merging has something to fold), the same prompt batches (the bundled
Alpaca sample, prompts of at most 64 tokens) and the same sampling seeds. It calls `PPOModule.sample` per
iteration and reads `time/generation` (the `generate` call, with merging and unmerging inside) and the
log-prob gap between generation and the training forward (`rollout/logprob_gap`, the health metric: ~0).
`--warmup` iterations come first (compiling happens there: its time is reported on its own), then `--steps`
timed ones. Generated tokens/s = rows x generated width / generation time (a finished row still costs a
step until every row has finished). fp32, `--threads` torch threads (1: see bench/README).

    python bench/rollout.py                         # smol, 5 variants, ~10 minutes on 2 CPU cores
    python bench/rollout.py --size tiny --steps 3   # the tiny random model, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SAMPLE_DATA, build_bases, device_description, quiet, run_isolated  # noqa: E402

VARIANTS = {
    "dynamic": {},
    "static": {"cache_implementation": "static"},
    "static+compile": {"cache_implementation": "static", "compile": True},
    "merged": {"merge_adapter": True},
    "merged+static+compile": {"merge_adapter": True, "cache_implementation": "static", "compile": True},
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}  # configs/smol/ppo.yaml


def run_variant(path: str, settings: dict, batch_size: int, max_new_tokens: int, max_prompt_length: int,
                warmup: int, steps: int, seed: int = 42) -> dict:
    import torch

    from alpaca_rlhf.data.prompts import PromptDataModule
    from alpaca_rlhf.models import LoraSpec, ModelSpec
    from alpaca_rlhf.modules.ppo import GenerationHParams, PPOHParams, PPOModule
    from alpaca_rlhf.modules.scorers import TokenIdScorer

    quiet()
    with tempfile.TemporaryDirectory() as tmp:
        module = PPOModule(policy=ModelSpec(name_or_path=path, dtype="float32"), scorer=TokenIdScorer([0]),
                           lora=LoraSpec(**LORA), ppo=PPOHParams(forward_batch_size=batch_size),
                           generation=GenerationHParams(max_new_tokens=max_new_tokens, seed=seed, **settings),
                           output_dir=f"{tmp}/out", log_samples_every=0)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # a trained adapter: B no longer zero, so merging changes the weights
            for name, p in module.policy.lm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        data = PromptDataModule(str(SAMPLE_DATA), max_prompt_length=max_prompt_length, val_set_size=0,
                                batch_size=batch_size, num_workers=0, seed=seed)
        data.connect(module.tokenizer)
        data.setup("fit")
        batches = iter(data.train_dataloader())
        runs = []
        for i in range(warmup + steps):
            module.iteration = i
            samples = module.sample(next(batches))
            mask = samples.response_mask
            gap = (samples.sampled_logprobs - samples.logprobs).abs()[mask]
            runs.append({"seconds": samples.timings["time/generation"], "width": mask.shape[1],
                         "rows": mask.shape[0], "length": float(mask.sum(1).float().mean()),
                         "gap": float(gap.mean()), "gap_max": float(gap.max())})
    timed = runs[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    return {"first_s": runs[0]["seconds"], "iteration_s": statistics.median(r["seconds"] for r in timed),
            "tokens_per_s": sum(r["rows"] * r["width"] for r in timed) / seconds,
            "width": statistics.mean(r["width"] for r in timed), "length": statistics.mean(r["length"] for r in timed),
            "gap": max(r["gap"] for r in runs), "gap_max": max(r["gap_max"] for r in runs)}


def table(results: dict[str, dict]) -> str:
    base = results.get("dynamic")
    head = ("| variant | first iteration s (incl. compiling) | generation s / iteration | generated tok/s | "
            "speed vs dynamic | generated width (mean length) | log-prob gap mean / max |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        speed = f"**{r['tokens_per_s'] / base['tokens_per_s']:.2f}**" if base else "-"
        lines.append(f"| {name} | {r['first_s']:.1f} | {r['iteration_s']:.2f} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['width']:.1f} ({r['length']:.1f}) | {r['gap']:.1e} / {r['gap_max']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", default="smol", choices=["tiny", "25M", "smol"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per iteration (configs/smol/ppo.yaml)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="configs/smol/ppo.yaml")
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations (compiling happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed iterations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's choice")
    args = parser.parse_args(argv)
    quiet()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_bases([args.size], tmp)[args.size]["path"]
        results = {}
        for name in names:
            results[name] = run_isolated(run_variant, threads=args.threads or None, path=path,
                                         settings=VARIANTS[name], batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                                         warmup=args.warmup, steps=args.steps)
            r = results[name]
            print(f"  {name}: {r['iteration_s']:.2f} s/iteration, {r['tokens_per_s']:.0f} tok/s, first "
                  f"{r['first_s']:.1f} s, gap {r['gap']:.1e} (max {r['gap_max']:.1e})", flush=True)
    print(f"\nRollout generation, {args.size}, PPOModule.sample on {device_description(args.threads or None)}: "
          f"{args.batch_size} prompts (<= {args.max_prompt_length} tokens) x <= {args.max_new_tokens} new tokens, "
          f"LoRA r {LORA['r']} all-linear, fp32; {args.warmup} warm-up + {args.steps} timed iterations per variant "
          f"(median); load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"{time.perf_counter() - started:.0f} s in all.\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
