"""The reward-model stage through the real `python cli.py`: tiny SFT model -> reward model -> merged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_cli

RM_CONFIG = str(ROOT / "configs/tiny/rm.yaml")
MERGED_SFT = "output/tiny/lora-alpaca-adapter-merged"

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path) -> None:
    # a fresh working directory: the configs' relative output/ paths land in it, data resolves to the repo
    run_cli(list(args), cwd=cwd)


def scalars(log_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_tiny_reward_model_learns_validates_resumes_and_merges(tiny_sft_run, tmp_path, monkeypatch):
    shutil.copytree(tiny_sft_run / MERGED_SFT, tmp_path / MERGED_SFT)  # the tiny config's base: SFT, merged
    cli("fit", "--config", RM_CONFIG, cwd=tmp_path)

    accuracy = scalars(tmp_path / "output/tiny/rm/run", "val/accuracy")
    assert accuracy[-1] >= 0.7, accuracy  # chance is 0.5: real answers beat their shuffled or cut-off copies
    adapter = tmp_path / "output/tiny/reward_model"
    stats = json.loads((adapter / "reward_stats.json").read_text())
    assert stats["split"] == "val" and stats["n"] == 2 * 60

    from cli import cli_main

    monkeypatch.chdir(tmp_path)
    validated = cli_main(["validate", "--config", RM_CONFIG, "--ckpt_path", "last"]).trainer.callback_metrics
    assert validated["val/accuracy"].item() == pytest.approx(accuracy[-1], abs=1e-6)
    assert validated["val/score_mean"].item() == pytest.approx(stats["mean"], abs=1e-4)

    more = yaml.safe_load(Path(RM_CONFIG).read_text())["trainer"]["max_steps"] + 20  # one more checkpoint interval
    cli("fit", "--config", RM_CONFIG, "--trainer.max_steps", str(more), "--ckpt_path", "last", cwd=tmp_path)
    last = torch.load(tmp_path / "output/tiny/checkpoints/rm/last.ckpt", weights_only=False)
    assert last["global_step"] == more

    cli("merge", "--adapter_path", "output/tiny/reward_model", cwd=tmp_path)
    merged = tmp_path / "output/tiny/reward_model-adapter-merged"
    assert json.loads((merged / "reward_stats.json").read_text())["split"] == "val"
    _check_merged_scores(merged)


def _check_merged_scores(merged: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alpaca_rlhf.data.preference import PreferenceDataModule

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()  # exactly as PPO loads it
    dm = PreferenceDataModule(data_path="alpaca_rlhf/data/samples/preferences_sample.jsonl", max_length=256,
                              val_set_size=60, seed=42)
    dm.connect(AutoTokenizer.from_pretrained(merged))
    dm.setup()
    batch = dm.collator()(dm.val_data)
    with torch.no_grad():
        chosen, rejected = model(**batch).logits.squeeze(-1).chunk(2)  # one score per prompt + response
    assert (chosen > rejected).float().mean() >= 0.8


def test_tiny_dpo_through_the_cli_learns_and_compare_reports_it(tiny_sft_run, tmp_path):
    """configs/tiny/dpo.yaml as a user runs it, then compare with the DPO adapter as the RLHF stage."""
    shutil.copytree(tiny_sft_run / MERGED_SFT, tmp_path / MERGED_SFT)
    cli("fit", "--config", str(ROOT / "configs/tiny/dpo.yaml"), "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    accuracy = scalars(tmp_path / "output/tiny/dpo/run", "val/rewards/accuracies")
    margins = scalars(tmp_path / "output/tiny/dpo/run", "val/rewards/margins")
    assert accuracy[-1] >= 0.7 and margins[-1] > margins[0], (accuracy, margins)  # chance is 0.5
    assert (tmp_path / "output/tiny/lora-dpo/adapter_model.safetensors").is_file()
    cli("compare", "--config", str(ROOT / "configs/tiny/compare.yaml"), "--sft_model", MERGED_SFT, "--rlhf_model",
        "output/tiny/lora-dpo", "--base_model", "null", "--reward_model", "null", "--prompts.max_prompts", "4",
        "--report_dir", "cmp", cwd=tmp_path)
    summary = json.loads((tmp_path / "cmp/summary.json").read_text())["summary"]
    assert set(summary["stages"]) == {"sft", "rlhf"} and summary["kl_rlhf_to_sft"]["mean"] > 0
