"""Benchmark: our reward model (RewardModule + PreferenceDataModule on Lightning) against TRL's RewardTrainer.

Both sides train the same random-weight LLaMA (built locally, nothing downloaded) as a one-label sequence
classifier with the same LoRA (r, alpha, dropout 0 and target modules of configs/tiny/rm.yaml; PEFT adds
the `score` head to `modules_to_save` on both sides), AdamW at a constant learning rate without weight
decay or gradient clipping, fp32 on CPU (bf16 autocast on a GPU), no gradient checkpointing, no eval, no
checkpoints, no loggers. They see the same batches in the same order: the bundled preference pairs
(`alpaca_rlhf/data/samples/preferences_sample.jsonl`) rendered with the Alpaca template and tokenized by our
DataModule, in the order of its seeded sampler; TRL gets those ids pre-tokenized (`chosen_ids`/`rejected_ids`)
and right-pads them with its own collator. Both put chosen and rejected through one stacked forward pass.

Each (side, repeat) runs in a fresh process: `--warmup` steps, then `--steps` timed steps. Throughput is
preference pairs (batch size x timed steps) over the timed steps' wall time (data loading, forward, backward
and optimizer step included), and over their CPU time (less sensitive to a busy machine). CPU memory comes
from one extra run per side under `common.track_live_memory()`: the peak RSS during training minus the RSS
before it; on a GPU, the peak allocated. Run: `pip install -e ".[bench]"`, then

    python bench/rm.py                        # tiny and 25M, about 15 minutes on 2 CPU cores
    python bench/rm.py --threads 1            # on a busy machine: no OpenMP threads fighting other programs
    python bench/rm.py --sizes 25M --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    MemoryMeter,
    StepMeter,
    build_bases,
    compare,
    device_description,
    lightning_trainer,
    median_of,
    trl_lora_config,
)

PREFERENCES = ROOT / "alpaca_rlhf" / "data" / "samples" / "preferences_sample.jsonl"
TINY_RM_CONFIG = ROOT / "configs" / "tiny" / "rm.yaml"
VAL_PAIRS = 8  # a token hold-out: our module scores it once after training to export the centring stats


def rm_config() -> dict:
    """The parts of configs/tiny/rm.yaml both sides share: LoRA, learning rate, batch, length, seed."""
    import yaml

    cfg = yaml.safe_load(TINY_RM_CONFIG.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    return {"lora": dict(model["lora"]), "lr": float(model["optimizer"]["init_args"]["lr"]),
            "batch_size": int(data["batch_size"]), "max_length": int(data["max_length"]),
            "seed": int(cfg.get("seed_everything", 42))}


def preference_data(tokenizer, batch_size: int, max_length: int, seed: int):
    from alpaca_rlhf.data import PreferenceDataModule

    data = PreferenceDataModule(data_path=str(PREFERENCES), format="seed", max_length=max_length,
                                val_set_size=VAL_PAIRS, batch_size=batch_size, num_workers=0, seed=seed)
    data.connect(tokenizer)
    data.setup("fit")
    return data


def sampler_order(n: int, seed: int, batch_size: int, total_steps: int) -> list[int]:
    """The pairs our seeded sampler feeds in the first `total_steps` batches (all within its first epoch)."""
    from alpaca_rlhf.data.sampling import SeededSampler

    if total_steps * batch_size > n:
        raise ValueError(f"{total_steps} steps of {batch_size} pairs exceed the {n} training pairs")
    return SeededSampler(n, seed=seed).order(0)[: total_steps * batch_size]


def _result(meter: StepMeter, memory: MemoryMeter, warmup: int, steps: int, batch_size: int) -> dict:
    window = meter.window(warmup, steps)
    pairs = batch_size * steps
    cpu_seconds = window["tokens"] / window["tokens_per_cpu_s"]
    return {**window, **memory.stop(), "pairs_per_s": pairs / window["seconds"],
            "pairs_per_cpu_s": pairs / cpu_seconds}


def run_ours(path: str, lora: dict, lr: float, batch_size: int, max_length: int, seed: int, warmup: int,
             steps: int, precision: str | None = None) -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf.models import LoraSpec, ModelSpec
    from alpaca_rlhf.modules import RewardModule

    L.seed_everything(seed, verbose=False)
    meter, memory = StepMeter(), MemoryMeter()

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
        module = RewardModule(model=ModelSpec(name_or_path=path, dtype="float32"), lora=LoraSpec(**lora),
                              output_dir=f"{tmp}/adapter", optimizer=optimizer, scheduler=None)
        data = preference_data(module.tokenizer, batch_size, max_length, seed)
        meter.attach(module.model)
        trainer = lightning_trainer(tmp, [Steps()], precision=precision, max_steps=warmup + steps)
        memory.start()
        trainer.fit(module, datamodule=data)
        return _result(meter, memory, warmup, steps, batch_size)


def run_trl(path: str, lora: dict, lr: float, batch_size: int, max_length: int, seed: int, warmup: int,
            steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl import RewardConfig, RewardTrainer

    from alpaca_rlhf.models import ModelSpec, load_sequence_classifier, load_tokenizer

    gpu = torch.cuda.is_available()
    meter, memory = StepMeter(), MemoryMeter()

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    spec = ModelSpec(name_or_path=path, dtype="float32")
    tokenizer = load_tokenizer(spec)
    data = preference_data(tokenizer, batch_size, max_length, seed)
    order = sampler_order(len(data.train_data), seed, batch_size, warmup + steps)
    pairs = [data.train_data[i] for i in order]
    dataset = Dataset.from_list([{"chosen_ids": p["chosen_input_ids"],
                                  "rejected_ids": p["rejected_input_ids"]} for p in pairs])
    set_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", weight_decay=0.0, max_grad_norm=0.0,  # our Lightning Trainer does not clip
            gradient_checkpointing=False, bf16=gpu, fp16=False, use_cpu=not gpu, max_length=max_length,
            center_rewards_coefficient=None,  # ours centres after training (reward_stats.json), not by loss
            train_sampling_strategy="sequential",  # the dataset is already in our sampler's order
            dataloader_num_workers=0, seed=seed, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
        )
        trainer = RewardTrainer(
            model=load_sequence_classifier(spec, pad_token_id=tokenizer.pad_token_id), args=args,
            train_dataset=dataset, processing_class=tokenizer,
            peft_config=trl_lora_config(lora, "SEQ_CLS"),
            callbacks=[Steps()],
        )
        trainer.remove_callback(PrinterCallback)
        prepared = trainer.train_dataset
        if prepared["chosen_ids"] != [p["chosen_input_ids"] for p in pairs] or len(prepared) != len(pairs):
            raise AssertionError("TRL's prepared preference pairs differ from ours")
        meter.attach(trainer.model)
        memory.start()
        trainer.train()
        return _result(meter, memory, warmup, steps, batch_size)


def markdown_table(rows: list[dict]) -> str:
    """One line per size: pairs/s and memory of both sides, and the ratios ours/TRL."""
    gpu = "cuda_peak_mib" in rows[0]["ours"]["runs"][0]
    memory = "peak GPU MiB" if gpu else "train MiB"
    head = ("| size | params | ours pairs/s | TRL pairs/s | speed ours/TRL | speed ours/TRL (CPU time) | "
            f"ours {memory} | TRL {memory} | memory ours/TRL |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        a, b = row["ours"]["runs"], row["TRL"]["runs"]
        pa, pb = median_of(a, "pairs_per_s"), median_of(b, "pairs_per_s")
        ca, cb = median_of(a, "pairs_per_cpu_s"), median_of(b, "pairs_per_cpu_s")
        if gpu:
            ma, mb = median_of(a, "cuda_peak_mib"), median_of(b, "cuda_peak_mib")
        else:
            ma, mb = (row[side]["memory"]["train_rss_mib"] if row[side]["memory"] else float("nan")
                      for side in ("ours", "TRL"))
        cells = [row["size"], f"{row['params'] / 1e6:.2f}M", f"{pa:.1f} ({_range(a)})",
                 f"{pb:.1f} ({_range(b)})", f"**{pa / pb:.2f}**", f"{ca / cb:.2f}",
                 f"{ma:,.0f}", f"{mb:,.0f}", f"**{ma / mb:.2f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _range(runs: list[dict]) -> str:
    values = [r["pairs_per_s"] for r in runs]
    return f"{min(values):.1f}-{max(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    defaults = rm_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="tiny,25M", 
                        help="comma-separated: tiny (the tiny configs), 25M, smol (the real SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="pairs per step")
    parser.add_argument("--max-length", type=int, default=defaults["max_length"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side and size (medians)")
    parser.add_argument("--no-memory-run", action="store_true",
                        help="skip the separate CPU memory run (see common.track_live_memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workdir", default=None, help="folder for the random bases (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step builds the optimizer)")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bases = build_bases(sizes, args.workdir or tmp)
        common = dict(lora=defaults["lora"], lr=args.lr, batch_size=args.batch_size,
                      max_length=args.max_length, seed=defaults["seed"], warmup=args.warmup, steps=args.steps)
        rows = []
        for size in sizes:
            print(f"{size}: {bases[size]['params'] / 1e6:.2f}M parameters", flush=True)
            results = compare({"ours": run_ours, "TRL": run_trl}, args.repeats,
                              memory_run=not args.no_memory_run, threads=args.threads,
                              path=bases[size]["path"], **common)
            rows.append({"size": size, "params": bases[size]["params"], **results})

    lora = defaults["lora"]
    print(f"\nReward model with LoRA, ours / TRL {trl_version()} RewardTrainer on "
          f"{device_description(args.threads)}: batch {args.batch_size} pairs, max length {args.max_length}, "
          f"LoRA r {lora['r']} alpha {lora['alpha']} on {','.join(lora['target_modules'])} + score head, "
          f"{args.warmup} warm-up + {args.steps} timed steps, median of {args.repeats} processes (min-max in "
          f"brackets); load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n")
    print(markdown_table(rows))
    return 0


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


if __name__ == "__main__":
    raise SystemExit(main())
