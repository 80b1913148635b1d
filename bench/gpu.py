"""Every stage at Llama-3.1-8B shapes on one GPU, held to 24 GB as a 4090 would be: one command for the day a
GPU is lent. Random weights, nothing downloaded.

    python bench/gpu.py                          # CUDA: Llama-3.1-8B shapes, memory capped at 24 GB (~5-8 min)
    python bench/gpu.py --shape tiny             # CPU or GPU: the same code at the tiny shape (its test)
    python bench/gpu.py --cap-gb 0               # no cap

What it runs, each in a fresh process (its own CUDA context and memory high-water mark), a few optimizer steps:
- SFT with LoRA (r 16, all linear layers, gradient checkpointing) on a bf16, an 8-bit and a 4-bit (NF4) base;
- the reward model (LoRA + score head) on a 4-bit base;
- PPO with a 4-bit policy (LoRA + value head; the reference is the policy with its adapter disabled) and a
  4-bit reward model, generating `max_new_tokens` per prompt.

Weights: a random LLaMA of the shape, built on the device in bf16 and saved once as a `from_pretrained` folder,
then loaded by each stage through the same `ModelSpec` a user's config fills (`quantization: 4bit` ...). The
tokenizer is the tiny one (1,024 ids used of the 128,256-row embedding): the shapes, not the text, set the cost.
Sequences are packed to the length limit (synthetic records), so tokens/s is at the full length.

Reported per stage: peak allocated GPU memory (`torch.cuda.max_memory_allocated`) under the cap, tokens/s over
the timed steps (non-pad tokens into the decoder, forward passes of every model included for PPO), PPO episodes/s
and the share of a PPO iteration spent generating; beside torchtune's published anchors for Llama-3.1-8B on one
RTX 4090 (LoRA 16.2 GiB at 3.1k tok/s, QLoRA 7.4 GiB at 2.4k tok/s; their settings, not ours).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepMeter, lightning_trainer, quiet, run_isolated  # noqa: E402

GIB = 1024**3
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
# batch, sequence length and steps per shape: 8B at a 4090's working size, tiny to finish in seconds
RUNS = {
    "llama-3.1-8b": dict(batch_size=2, max_length=1024, warmup=2, steps=4, ppo_batch=8, prompt_length=128,
                         max_new_tokens=64, ppo_warmup=1, ppo_steps=2),
    "tiny": dict(batch_size=2, max_length=128, warmup=1, steps=2, ppo_batch=4, prompt_length=96,
                 max_new_tokens=8, ppo_warmup=1, ppo_steps=1),
}
ANCHORS = {"sft_bf16": "torchtune LoRA: 16.2 GiB, 3.1k tok/s (RTX 4090)",
           "sft_4bit": "torchtune QLoRA: 7.4 GiB, 2.4k tok/s (RTX 4090)"}
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def build_base(shape: str, folder: str) -> dict:
    """A random LLaMA of the shape (bf16 on a GPU) saved with the tiny tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_rlhf.models import TINY_LLAMA, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    shape_cfg = dict(SHAPES[shape])
    cfg = LlamaConfig(**{**TINY_LLAMA, **shape_cfg, "vocab_size": shape_cfg.get("vocab_size") or len(tokenizer),
                         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id})
    cuda = torch.cuda.is_available()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    return {"parameters": model.num_parameters()}


def write_data(folder: str, max_length: int) -> dict:
    """Alpaca records and preference pairs long enough to fill `max_length` tokens (then truncated to it)."""
    words = ("the quick brown fox jumps over a lazy dog and then runs far away into the green hills " * 400).split()
    text = " ".join(words[: max_length * 2])
    records = [{"instruction": f"Write a long story number {i}.", "input": "", "output": text} for i in range(64)]
    half = " ".join(words[: max_length // 3])  # a pair's responses share the length limit with the prompt
    pairs = [{"prompt": f"Tell me a story number {i}.", "chosen": half, "rejected": " ".join(reversed(half.split()))}
             for i in range(64)]
    Path(folder, "sft.json").write_text(json.dumps(records))
    Path(folder, "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    return {"sft": f"{folder}/sft.json", "pairs": f"{folder}/pairs.jsonl"}


def _cap(cap_gb: float) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
    return total / GIB


def _peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def _precision() -> str:
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def _spec(path: str, quantization: str | None):
    import torch

    from alpaca_rlhf.models import ModelSpec

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return ModelSpec(name_or_path=path, dtype=dtype, quantization=quantization, gradient_checkpointing=True)


def run_sft(path: str, data: str, quantization: str | None, run: dict, cap_gb: float) -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf.data import AlpacaDataModule
    from alpaca_rlhf.models import LoraSpec
    from alpaca_rlhf.modules.sft import SFTModule

    quiet()
    device_gib = _cap(cap_gb)
    meter = StepMeter()

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        module = SFTModule(model=_spec(path, quantization), lora=LoraSpec(**LORA), output_dir=f"{tmp}/adapter",
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), scheduler=None)
        dm = AlpacaDataModule(data_path=data, cutoff_len=run["max_length"], batch_size=run["batch_size"],
                              val_set_size=0, seed=0)
        meter.attach(module.model)
        trainer = lightning_trainer(tmp, [Steps()], precision=_precision(), max_steps=run["warmup"] + run["steps"])
        trainer.fit(module, datamodule=dm)
        return {**meter.window(run["warmup"], run["steps"]), "peak_gib": _peak(), "device_gib": device_gib}


def run_rm(path: str, data: str, run: dict, cap_gb: float) -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf.data import PreferenceDataModule
    from alpaca_rlhf.models import LoraSpec
    from alpaca_rlhf.modules import RewardModule

    quiet()
    device_gib = _cap(cap_gb)
    meter = StepMeter()

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        module = RewardModule(model=_spec(path, "4bit"), lora=LoraSpec(**LORA), output_dir=f"{tmp}/adapter",
                              optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), scheduler=None)
        dm = PreferenceDataModule(data_path=data, format="prompt_chosen_rejected", max_length=run["max_length"],
                                  batch_size=run["batch_size"], val_set_size=0, seed=0)
        meter.attach(module.model)
        trainer = lightning_trainer(tmp, [Steps()], precision=_precision(), max_steps=run["warmup"] + run["steps"])
        trainer.fit(module, datamodule=dm)
        return {**meter.window(run["warmup"], run["steps"]), "peak_gib": _peak(), "device_gib": device_gib}


def make_reward_model(path: str, folder: str) -> dict:
    """A merged reward-model folder of the shape: the base as a sequence classifier with a random score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype="auto")
    model.config.pad_token_id = model.config.pad_token_id or 3
    model.save_pretrained(folder, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    Path(folder, "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return {"folder": folder}


def run_ppo(path: str, rm_path: str, data: str, run: dict, cap_gb: float) -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
    from alpaca_rlhf.data import PromptDataModule
    from alpaca_rlhf.models import LoraSpec
    from alpaca_rlhf.modules.ppo import GenerationHParams, PPOHParams, PPOModule
    from alpaca_rlhf.modules.scorers import RewardModelScorer

    quiet()
    device_gib = _cap(cap_gb)
    stats: list[dict] = []
    ends: list[float] = []

    class Iterations(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            stats.append(dict(pl_module.last_stats))

    total = run["ppo_warmup"] + run["ppo_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        module = PPOModule(policy=_spec(path, "4bit"), scorer=RewardModelScorer(_spec(rm_path, "4bit")),
                           lora=LoraSpec(**LORA), ppo=PPOHParams(ppo_epochs=2, forward_batch_size=run["ppo_batch"]),
                           generation=GenerationHParams(max_new_tokens=run["max_new_tokens"]),
                           kl_controller=rl.FixedKLController(0.05),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-5), output_dir=f"{tmp}/out",
                           save_freq=0, log_samples_every=0)
        module.export = lambda *a, **k: None  # the export is not part of the measurement
        dm = PromptDataModule(data_path=data, max_prompt_length=run["prompt_length"], batch_size=run["ppo_batch"],
                              val_set_size=0, seed=0)
        trainer = lightning_trainer(tmp, [Iterations()], precision=_precision(), max_epochs=1,
                                    limit_train_batches=total)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        ends.insert(0, start)
        timed = stats[run["ppo_warmup"]:]
        seconds = ends[-1] - ends[run["ppo_warmup"]]
        generation = sum(s["time/generation"] for s in timed)
        return {"episodes_per_s": run["ppo_batch"] * len(timed) / seconds, "iteration_s": seconds / len(timed),
                "generation_share": generation / seconds, "peak_gib": _peak(), "device_gib": device_gib,
                "response_length": sum(s["rollout/response_length"] for s in timed) / len(timed)}


def fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(results: dict, shape: str, cap_gb: float) -> str:
    lines = [f"Shape {shape}, memory cap {cap_gb or 'none'} GB. Peak = torch.cuda.max_memory_allocated.", "",
             "| stage | peak memory (GiB) | tokens/s | PPO episodes/s | generation share | anchor |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | | |")
            continue
        lines.append(f"| {name} | {fmt(r.get('peak_gib'))} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{fmt(r.get('episodes_per_s'))} | {fmt(r.get('generation_share'), '.0%')} | "
                     f"{ANCHORS.get(name, '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--cap-gb", type=float, default=24.0, help="GPU memory cap (GB); 0 = none")
    parser.add_argument("--stages", nargs="+", default=["sft_bf16", "sft_8bit", "sft_4bit", "rm_4bit", "ppo_4bit"])
    parser.add_argument("--out", default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    import torch

    if args.shape != "tiny" and not torch.cuda.is_available():
        raise SystemExit(f"{args.shape} needs a CUDA GPU; on CPU run --shape tiny")
    run = RUNS[args.shape]
    results: dict[str, dict] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base, rm = f"{tmp}/base", f"{tmp}/rm"
        info = run_isolated(build_base, shape=args.shape, folder=base)
        print(f"built {args.shape}: {info['parameters'] / 1e9:.2f}B parameters ({time.time() - started:.0f} s)",
              flush=True)
        data = write_data(tmp, run["max_length"])
        jobs = {"sft_bf16": functools.partial(run_sft, quantization=None),
                "sft_8bit": functools.partial(run_sft, quantization="8bit"),
                "sft_4bit": functools.partial(run_sft, quantization="4bit")}
        for name in args.stages:
            t0 = time.time()
            try:
                if name in jobs:
                    results[name] = run_isolated(jobs[name], path=base, data=data["sft"], run=run, cap_gb=args.cap_gb)
                elif name == "rm_4bit":
                    results[name] = run_isolated(run_rm, path=base, data=data["pairs"], run=run, cap_gb=args.cap_gb)
                elif name == "ppo_4bit":
                    if not Path(rm).exists():
                        run_isolated(make_reward_model, path=base, folder=rm)
                    results[name] = run_isolated(run_ppo, path=base, rm_path=rm, data=data["sft"], run=run,
                                                 cap_gb=args.cap_gb)
                else:
                    raise ValueError(f"unknown stage {name}")
            except Exception as e:  # one stage's failure (an OOM under the cap) is a result too
                results[name] = {"error": str(e).strip().splitlines()[-1]}
            print(f"{name}: {json.dumps(results[name])} ({time.time() - t0:.0f} s)", flush=True)
    text = table(results, args.shape, args.cap_gb)
    print(text)
    print(f"\nwhole run: {(time.time() - started) / 60:.1f} min")
    if args.out:
        summary = {"shape": args.shape, "cap_gb": args.cap_gb, "results": results}
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    main()
