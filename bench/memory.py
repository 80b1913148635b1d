"""The memory preflight's estimate held against the measured peak, per stage and shape (CPU or GPU).

    python bench/memory.py                     # tiny and smol (SmolLM2-135M, real weights) shapes, SFT and RM
    python bench/memory.py --sizes tiny --stages sft rm ppo
    python bench/memory.py --sizes smol --quantization none 8bit 4bit   # the quantized (QLoRA) rows

Measured on CPU: the bytes of every tensor alive at the peak of one optimizer step on the worst batch the config
allows (every sequence at its length limit, every position labelled), from PyTorch's memory profiler timeline
plus the weights and adapters already in memory (CPU only for now; a GPU run would read
`torch.cuda.max_memory_allocated`, not written yet). The estimate is
`alpaca_rlhf.preflight.estimate` of the same config. PPO is measured through one real iteration (generation
included) on the tiny shape's prompts, whose lengths and early EOS make it a lower bound of the worst case.
A quantized row loads the base in 8 or 4 bits (bitsandbytes, bf16 compute) and counts the packed weights with
their scales; PEFT's k-bit preparation casts embeddings, lm_head and norms to fp32, and the residual stream
runs in fp32 from there (activations 4 bytes wide even under bf16-mixed); the estimate includes both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3
SMOL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def configs(size: str, stage: str, work: Path, quantization: str = "none") -> list[str]:
    """`fit` arguments of a stage at a size (and base quantization); the batch and lengths are the config's own."""
    if quantization != "none":
        return [*configs(size, stage, work), "--model.init_args.model.quantization", quantization,
                "--model.init_args.model.dtype", "bfloat16"]
    if size == "tiny":
        base = ["--model.init_args.model.name_or_path", str(work / "base"), "--model.init_args.model.tiny", "{}"]
        if stage == "ppo":
            return ["--config", str(ROOT / "configs/tiny/ppo.yaml"), *base, "--model.init_args.scorer",
                    json.dumps({"class_path": "alpaca_rlhf.modules.scorers.TokenIdScorer",
                                "init_args": {"token_ids": [5, 6, 7]}})]
        return ["--config", str(ROOT / f"configs/tiny/{stage}.yaml"), *base]
    return ["--config", str(ROOT / f"configs/smol/{stage}.yaml"), "--model.init_args.model.name_or_path", str(SMOL)]


def instantiate(args: list[str]):
    import lightning as L

    from alpaca_rlhf.parsers import _cli_class, _trainer_class

    argv, sys.argv = sys.argv, sys.argv[:1]  # this script's own flags are not the stage's
    try:
        return _cli_class()(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                            subclass_mode_data=True, auto_configure_optimizers=False, run=False,
                            trainer_class=_trainer_class(),  # precision: auto, as `fit` has it
                            args=args + ["--preflight", "off"])
    finally:
        sys.argv = argv


def tensor_bytes(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for sub in module.modules():  # 8-bit row scales and 4-bit block scales live beside the packed weights
        weight = getattr(sub, "weight", None)
        extra = [getattr(weight, "SCB", None), getattr(getattr(weight, "quant_state", None), "absmax", None)]
        total += sum(x.numel() * x.element_size() for x in extra if hasattr(x, "element_size"))
    return total


def peak_during(fn) -> int:
    """Peak bytes of CPU tensors allocated (and still alive) during `fn`, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    current = peak = 0
    for _, action, (key, _), size in p._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def measure_supervised(cli, stage: str) -> int:
    import torch

    module = cli.model
    data = cli.config["data"]["init_args"]
    vocab = module.tokenizer.vocab_size
    batch, length = data["batch_size"], data["max_length" if stage == "rm" else "cutoff_len"]
    rows = 2 * batch if stage == "rm" else batch
    ids = torch.randint(5, vocab, (rows, length))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if stage == "sft":
        example["labels"] = ids.clone()
    module.log = module.log_dict = lambda *a, **k: None  # outside the fit loop: the step's own logging is off
    module.trainer = cli.trainer
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.train()
    from alpaca_rlhf.hardware import resolve_precision

    precision = str(resolve_precision(cli.config["trainer"]["precision"], "cpu")[0])  # "auto" as the trainer does
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))

    def step():
        with autocast:
            loss = module.training_step(example, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = tensor_bytes(module)
    return before + peak_during(step)


def measure_ppo(cli) -> int:
    import lightning as L

    from alpaca_rlhf.hardware import resolve_precision

    module, data = cli.model, cli.datamodule
    before = tensor_bytes(module)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", precision=resolve_precision(cli.config["trainer"]["precision"], "cpu")[0])
    module.save_freq = 0
    module.overwrite_output_dir = True
    return before + peak_during(lambda: trainer.fit(module, data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "smol"], choices=["tiny", "smol"])
    parser.add_argument("--stages", nargs="+", default=["sft", "rm"], choices=["sft", "rm", "ppo"])
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "8bit", "4bit"],
                        help="the base model's loading: full precision, or 8/4-bit (bitsandbytes)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import os

    import torch

    from alpaca_rlhf.parsers import parse_fit_config
    from alpaca_rlhf.preflight import estimate

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the configs' output/ paths land here
        work = Path(tmp)
        for size in args.sizes:
            if size == "smol" and not SMOL.is_file():
                print(f"smol: {SMOL} is absent, skipped")
                continue
            for stage in args.stages:
                for quantization in args.quantization:
                    fit_args = configs(size, stage, work, quantization)
                    cli = instantiate(fit_args)  # builds the tiny base on first use, converts the .gguf once
                    est = estimate(parse_fit_config(fit_args))
                    measured = measure_ppo(cli) if stage == "ppo" else measure_supervised(cli, stage)
                    rows.append((size, stage, quantization, est.total, measured))
                    print(f"{size:5s} {stage:4s} {quantization:5s} estimated {est.total / 2**20:9.1f} MiB  measured "
                          f"{measured / 2**20:9.1f} MiB  estimate/measured {est.total / measured:.2f}", flush=True)
                    print(est.table(), flush=True)
                    del cli
    print("\n| size | stage | base | estimated MiB | measured MiB | estimate / measured |\n|---|---|---|---|---|---|")
    for size, stage, quantization, e, m in rows:
        print(f"| {size} | {stage} | {quantization} | {e / 2**20:,.1f} | {m / 2**20:,.1f} | {e / m:.2f} |")


if __name__ == "__main__":
    main()
