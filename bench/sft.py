"""Benchmark our LoRA SFT (SFTModule + AlpacaDataModule on Lightning) against TRL's SFTTrainer.

Both sides train the same random-weight LLaMA (built locally, nothing downloaded) with the same LoRA (r,
alpha and target modules of configs/tiny/sft.yaml, dropout 0, no modules_to_save), AdamW at the config's
learning rate held constant, no weight decay, no gradient clipping, no gradient checkpointing, fp32 on CPU
(bf16 autocast on a GPU), no evaluation, checkpoints or loggers. They see the same batches in the same order:
the bundled Alpaca sample rendered with the Alpaca template, prompt masked, EOS appended, cut to
`--max-length`, in the order of our DataModule's seeded sampler. TRL gets the records in its
prompt/completion format and tokenizes them itself; its worker checks that this gives exactly our ids and
labels.

Each timed run is a fresh process: `--warmup` steps, then `--steps` timed ones. Throughput is the non-pad
input tokens the decoder received during the timed steps over their wall time (data loading, forward,
backward and optimizer step included). Memory (CPU) comes from one more run per side with glibc's mmap
threshold fixed, so that RSS tracks live memory: the peak RSS during training minus the RSS before it
(see bench/common.py). On a GPU it is the peak allocated. Install with `pip install -e ".[bench]"`, then

    python bench/sft.py                                  # tiny and 25M: a few minutes on 2 CPU cores
    python bench/sft.py --sizes 25M --steps 20 --repeats 5 --threads 0   # torch's threads
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SAMPLE_DATA,
    MemoryMeter,
    StepMeter,
    build_bases,
    compare,
    device_description,
    lightning_trainer,
    markdown_table,
    quiet,
    tiny_config,
    trl_lora_config,
)


def alpaca_datamodule(tokenizer, batch_size: int, max_length: int, seed: int):
    """Our DataModule on the bundled sample, set up (no validation split)."""
    from alpaca_rlhf.data.sft import AlpacaDataModule

    data = AlpacaDataModule(data_path=str(SAMPLE_DATA), template="alpaca", cutoff_len=max_length,
                            val_set_size=0, batch_size=batch_size, num_workers=0, seed=seed)
    data.connect(tokenizer)
    data.setup("fit")
    return data


def trl_records(path: str, batch_size: int, max_length: int, seed: int, total_steps: int) -> dict:
    """The records in the order our DataModule's sampler draws them over `total_steps` batches.

    Returns:
        `rows` ({prompt, completion} for TRL) and our tokenization of each, `input_ids` and `labels`.
        Built in the parent, so that TRL's worker never imports Lightning.
    """
    from alpaca_rlhf.data.sft import IGNORE_INDEX, tokenize_example
    from alpaca_rlhf.models import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(name_or_path=path))
    data = alpaca_datamodule(tokenizer, batch_size, max_length, seed)
    # the records setup() kept (it drops those whose prompt alone fills max_length), aligned with train_data
    def learnable(record: dict) -> bool:
        labels = tokenize_example(tokenizer, data.prompt_of(record), record["output"], max_length)["labels"]
        return any(label != IGNORE_INDEX for label in labels)

    kept = [r for r in data.load_records() if learnable(r)]
    if len(kept) != len(data.train_data):
        raise RuntimeError("could not line up the kept records with AlpacaDataModule.train_data")
    n = len(kept)
    epochs = -(-total_steps // -(-n // batch_size))
    if epochs > 1 and n % batch_size:
        raise ValueError(f"{total_steps} steps span {epochs} epochs of {n} records, which batch size "
                         f"{batch_size} does not divide: TRL's batches would straddle our epoch boundaries. "
                         "Use fewer steps.")
    sampler = data.train_dataloader().sampler  # our SeededSampler: reshuffles each epoch with seed + epoch
    order = [i for epoch in range(epochs) for i in sampler.order(epoch)]
    return {
        "rows": [{"prompt": data.prompt_of(kept[i]), "completion": kept[i]["output"]} for i in order],
        "input_ids": [data.train_data[i]["input_ids"] for i in order],
        "labels": [data.train_data[i]["labels"] for i in order],
    }


def run_ours(path: str, lora: dict, lr: float, batch_size: int, max_length: int, seed: int, warmup: int,
             steps: int, precision: str | None = None) -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf.models import LoraSpec, ModelSpec
    from alpaca_rlhf.modules.sft import SFTModule

    quiet()
    L.seed_everything(seed, verbose=False)
    meter, memory = StepMeter(), MemoryMeter()

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        module = SFTModule(model=ModelSpec(name_or_path=path, dtype="float32"),
                           lora=LoraSpec(**lora, modules_to_save=None), output_dir=f"{tmp}/adapter",
                           optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
                           scheduler=None)
        data = alpaca_datamodule(module.tokenizer, batch_size, max_length, seed)
        meter.attach(module.model)
        trainer = lightning_trainer(tmp, [Steps()], precision=precision, max_steps=warmup + steps)
        memory.start()
        trainer.fit(module, datamodule=data)
        return {**meter.window(warmup, steps), **memory.stop()}


def run_trl(path: str, lora: dict, lr: float, batch_size: int, max_length: int, seed: int, warmup: int,
            steps: int, records: dict, loss_type: str | None = None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alpaca_rlhf.models import ModelSpec, load_causal_lm, load_tokenizer

    quiet()
    gpu = torch.cuda.is_available()
    meter, memory = StepMeter(), MemoryMeter()

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    spec = ModelSpec(name_or_path=path, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", weight_decay=0.0, max_grad_norm=0.0,  # 0: no clipping, like our Trainer here
            gradient_checkpointing=False, bf16=gpu, fp16=False, use_cpu=not gpu,  # TRL defaults both on
            max_length=max_length, packing=False, completion_only_loss=True,
            train_sampling_strategy="sequential",  # the records come in our sampler's order
            dataloader_num_workers=0, seed=seed, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
            **({"loss_type": loss_type} if loss_type else {}),
        )
        trainer = SFTTrainer(
            model=load_causal_lm(spec), args=args, train_dataset=Dataset.from_list(records["rows"]),
            processing_class=load_tokenizer(spec),
            peft_config=trl_lora_config(lora, "CAUSAL_LM"),
            callbacks=[Steps()],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        prepared = trainer.train_dataset
        if prepared["input_ids"] != records["input_ids"] or prepared["labels"] != records["labels"]:
            raise AssertionError("TRL tokenized the prompt/completion records unlike our DataModule")
        meter.attach(trainer.model)
        memory.start()
        trainer.train()
        return {**meter.window(warmup, steps), **memory.stop(), "loss_type": args.loss_type}


def main(argv: list[str] | None = None) -> int:
    defaults = tiny_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="tiny,25M", 
                        help="comma-separated: tiny, 25M, smol (the real SmolLM2-135M from ../shared/models)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="from the tiny config")
    parser.add_argument("--max-length", type=int, default=defaults["max_length"], help="from the tiny config")
    parser.add_argument("--lr", type=float, default=defaults["lr"], help="from the tiny config")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and size (medians)")
    parser.add_argument("--no-memory-run", action="store_true", help="skip the separate CPU memory runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run; 0: torch's choice (one per core). With two on a busy "
                             "2-core machine, a step can stall for ten times its length")
    parser.add_argument("--trl-loss-type", default=None,
                        help="TRL's loss_type, nll or chunked_nll; unset: TRL's default (chunked_nll)")
    parser.add_argument("--workdir", default=None, help="where to build the random models; unset: a temp dir")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step also builds the optimizer)")
    quiet()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    threads = args.threads or None
    shared = dict(lora=defaults["lora"], lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                  seed=defaults["seed"], warmup=args.warmup, steps=args.steps)

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bases = build_bases(sizes, args.workdir or tmp)
        for size in sizes:
            path = bases[size]["path"]
            print(f"{size}: {bases[size]['params'] / 1e6:.2f}M parameters", flush=True)
            records = trl_records(path, args.batch_size, args.max_length, defaults["seed"],
                                  args.warmup + args.steps)
            workers = {"ours": run_ours,
                       "TRL": functools.partial(run_trl, records=records, loss_type=args.trl_loss_type)}
            results = compare(workers, args.repeats, memory_run=not args.no_memory_run, threads=threads,
                              path=path, **shared)
            rows.append({"size": size, "params": bases[size]["params"], **results})

    lora, trl_loss = defaults["lora"], rows[0]["TRL"]["runs"][0]["loss_type"]
    print(f"\nLoRA SFT, ours vs TRL {version('trl')} SFTTrainer (loss_type {trl_loss}); "
          f"{device_description(threads)}. Batch {args.batch_size}, max length {args.max_length}, "
          f"LoRA r {lora['r']} alpha {lora['alpha']} on {len(lora['target_modules'])} projections, "
          f"lr {args.lr}; "
          f"{args.warmup} warm-up + {args.steps} timed steps, median of {args.repeats} runs per side; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
