"""The SFT stage as a user runs it: the real `python cli.py` in a subprocess, on the tiny config."""

from pathlib import Path

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_tiny_sft_fit_and_merge_through_the_cli(tmp_path):
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "30",
             "--trainer.val_check_interval", "15"], cwd=tmp_path)
    out = tmp_path / "output/tiny"
    events = list((out / "sft").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(acc.Tags()["scalars"])
    assert any("samples/generation" in t for t in acc.Tags()["tensors"])  # the logged generation
    assert (out / "lora-alpaca/adapter_model.safetensors").is_file()
    assert (out / "checkpoints/sft/last.ckpt").is_file()

    proc = run_cli(["merge", "--adapter_path", "output/tiny/lora-alpaca"], cwd=tmp_path)
    assert "lora-alpaca-adapter-merged" in proc.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "lora-alpaca-adapter-merged")

    # resume continues the same run to a later step
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "40",
             "--ckpt_path", "last"], cwd=tmp_path)
    import torch

    assert torch.load(out / "checkpoints/sft/last.ckpt", weights_only=False)["global_step"] == 40


def test_tiny_sft_ddp_two_cpu_processes_export_one_adapter(tmp_path):
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "10",
             "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"], cwd=tmp_path)
    adapters = list(Path(tmp_path).rglob("adapter_model.safetensors"))
    assert len(adapters) == 1 and adapters[0].parent.name == "lora-alpaca"
    assert not list((tmp_path / "output/tiny").glob(".*tmp*"))


def test_help_and_print_config_of_the_real_config(tmp_path):
    assert "merge" in run_cli(["--help"], cwd=tmp_path).stdout
    assert "--ckpt_path" in run_cli(["fit", "--help"], cwd=tmp_path).stdout
    module_help = run_cli(["fit", "--model.help", "alpaca_rlhf.modules.SFTModule"], cwd=tmp_path).stdout
    assert "sample_instruction" in module_help and "Instruction whose greedy generation" in module_help
    printed = run_cli(["fit", "--config", str(ROOT / "configs/sft.yaml"), "--print_config"], cwd=tmp_path).stdout
    assert "meta-llama/Llama-3.1-8B" in printed and "yahma/alpaca-cleaned" in printed and "8bit" in printed
