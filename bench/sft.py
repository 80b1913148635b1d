"""Benchmark: our LoRA SFT (SFTModule + AlpacaDataModule on Lightning) against TRL's SFTTrainer.

Both sides train the same random-weight LLaMA (built locally, nothing downloaded) with the same LoRA
(r, alpha, dropout 0, target modules from configs/tiny/sft.yaml, no modules_to_save), AdamW at a constant
learning rate without weight decay or gradient clipping, fp32 on CPU (bf16 autocast on a GPU), no gradient
checkpointing, no eval, no checkpoints, no loggers. They see the same batches in the same order: the bundled
Alpaca sample rendered with the Alpaca template, prompt masked, EOS appended, cut to `--max-length`, in the
order of our DataModule's seeded sampler. TRL gets the records in its prompt/completion format and
tokenizes them itself; the worker checks that this gives exactly our input ids and labels.

Each (side, repeat) runs in a fresh process: `--warmup` steps, then `--steps` timed steps. Throughput is the
non-pad input tokens the decoder received over the timed steps divided by their wall time (data loading,
forward, backward and optimizer step included). Memory is the peak RSS during training minus the RSS
before it (GPU: peak allocated). Run: `pip install -e ".[bench]"`, then

    python bench/sft.py                       # tiny and 25M, a few minutes on 2 CPU cores
    python bench/sft.py --sizes 25M --steps 40 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (SAMPLE_DATA, MemoryMeter, StepMeter, build_bases, device_description,  # noqa: E402
                    interleaved, markdown_table, tiny_config)


def alpaca_data(tokenizer, batch_size: int, max_length: int, seed: int):
    """Our DataModule, set up, with every record it keeps (aligned with `train_data`) and its sampler's order."""
    from alpaca_rlhf.data import AlpacaDataModule
    from alpaca_rlhf.data.sft import IGNORE_INDEX, tokenize_example

    data = AlpacaDataModule(data_path=str(SAMPLE_DATA), template="alpaca", cutoff_len=max_length,
                            val_set_size=0, batch_size=batch_size, num_workers=0, seed=seed)
    data.connect(tokenizer)
    data.setup("fit")
    kept = [r for r in data.load_records()
            if any(label != IGNORE_INDEX for label in tokenize_example(
                tokenizer, data.prompt_of(r), r["output"], max_length)["labels"])]
    assert len(kept) == len(data.train_data)
    return data, kept


def epoch_orders(n: int, seed: int, batch_size: int, total_steps: int) -> list[int]:
    """Our sampler's indices for as many epochs as `total_steps` batches need, concatenated."""
    from alpaca_rlhf.data.sampling import SeededSampler

    steps_per_epoch = -(-n // batch_size)
    epochs = -(-total_steps // steps_per_epoch)
    if epochs > 1 and n % batch_size:
        raise ValueError(f"{total_steps} steps span {epochs} epochs of {n} records, which batch size {batch_size} "
                         "does not divide: TRL's batches would straddle our epoch boundary. Use fewer steps.")
    sampler = SeededSampler(n, seed=seed)
    return [i for epoch in range(epochs) for i in sampler.order(epoch)]


def run_ours(path: str, lora: dict, lr: float, batch_size: int, max_length: int, seed: int, warmup: int,
             steps: int) -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf.models import LoraSpec, ModelSpec
    from alpaca_rlhf.modules import SFTModule

    L.seed_everything(seed, verbose=False)
    gpu = torch.cuda.is_available()
    meter, memory = StepMeter(), MemoryMeter()

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        module = SFTModule(model=ModelSpec(name_or_path=path, dtype="float32"),
                           lora=LoraSpec(**lora, modules_to_save=None), adapter_dir=f"{tmp}/adapter",
                           optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0), scheduler=None)
        data, _ = alpaca_data(module.tokenizer, batch_size, max_length, seed)
        meter.attach(module.model)
        trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1,
                            precision="bf16-mixed" if gpu else "32-true", max_steps=warmup + steps,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[Steps()], default_root_dir=tmp)
        memory.start()
        trainer.fit(module, datamodule=data)
        return {**meter.window(warmup, steps), **memory.stop()}


def run_trl(path: str, lora: dict, lr: float, batch_size: int, max_length: int, seed: int, warmup: int,
            steps: int, loss_type: str | None = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alpaca_rlhf.models import ModelSpec, load_causal_lm, load_tokenizer

    gpu = torch.cuda.is_available()
    meter, memory = StepMeter(), MemoryMeter()

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    spec = ModelSpec(name_or_path=path, dtype="float32")
    tokenizer = load_tokenizer(spec)
    data, records = alpaca_data(tokenizer, batch_size, max_length, seed)
    order = epoch_orders(len(records), seed, batch_size, warmup + steps)
    dataset = Dataset.from_list([{"prompt": data.prompt_of(records[i]), "completion": records[i]["output"]}
                                 for i in order])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", weight_decay=0.0, max_grad_norm=0.0,  # our Lightning Trainer does not clip
            gradient_checkpointing=False, bf16=gpu, fp16=False, use_cpu=not gpu,
            max_length=max_length, packing=False, completion_only_loss=True,
            train_sampling_strategy="sequential",  # the dataset is already in our sampler's order
            dataloader_num_workers=0, seed=seed, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
            **({"loss_type": loss_type} if loss_type else {}),
        )
        trainer = SFTTrainer(
            model=load_causal_lm(spec), args=args, train_dataset=dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                   target_modules=list(lora["target_modules"]), bias=lora.get("bias", "none"),
                                   task_type="CAUSAL_LM"),
            callbacks=[Steps()],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        expected = [data.train_data[i] for i in order]
        prepared = trainer.train_dataset
        same = (prepared["input_ids"] == [e["input_ids"] for e in expected]
                and prepared["labels"] == [e["labels"] for e in expected])
        if not same:
            raise AssertionError("TRL's tokenized prompt/completion records differ from ours")
        meter.attach(trainer.model)
        memory.start()
        trainer.train()
        return {**meter.window(warmup, steps), **memory.stop(), "loss_type": args.loss_type}


def main(argv: list[str] | None = None) -> int:
    defaults = tiny_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="tiny,25M", help="comma-separated: tiny (configs/tiny/sft.yaml), 25M")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--max-length", type=int, default=defaults["max_length"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side and size; medians reported")
    parser.add_argument("--trl-loss-type", default=None,
                        help="TRL's loss_type; default: TRL's own default (chunked_nll in trl 1.12)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--workdir", default=None, help="where the random base models are built (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step builds the optimizer)")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bases = build_bases(sizes, args.workdir or tmp)
        common = dict(lora=defaults["lora"], lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                      seed=defaults["seed"], warmup=args.warmup, steps=args.steps)
        workers = {"ours": run_ours, "TRL": functools.partial(run_trl, loss_type=args.trl_loss_type)}
        rows = []
        for size in sizes:
            print(f"{size}: {bases[size]['params'] / 1e6:.2f}M parameters", flush=True)
            results = interleaved(workers, args.repeats, threads=args.threads, path=bases[size]["path"],
                                  **common)
            rows.append({"size": size, "params": bases[size]["params"], **results})

    lora = defaults["lora"]
    print(f"\nSFT with LoRA, ours / TRL {trl_version()} SFTTrainer (loss_type {rows[0]['TRL'][0]['loss_type']}) on "
          f"{device_description(args.threads)}: batch {args.batch_size}, max length {args.max_length}, LoRA r {lora['r']} "
          f"alpha {lora['alpha']} on {','.join(lora['target_modules'])}, {args.warmup} warm-up + {args.steps} "
          f"timed steps, median of {args.repeats} processes (min-max in brackets); load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n")
    print(markdown_table(rows))
    return 0


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


if __name__ == "__main__":
    raise SystemExit(main())
