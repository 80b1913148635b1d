"""(b) The tiny chain as a user runs it: SFT -> merge -> RM -> merge -> `python cli.py fit --config
configs/tiny/ppo.yaml` in a subprocess; the reward model's mean score on held-out prompts rises."""

import shutil

import pytest
import torch
from conftest import ROOT, run_cli

from cli import cli_main

pytestmark = pytest.mark.slow
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def held_out_score(work, *extra) -> float:
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli = cli_main(["validate", "--config", str(ROOT / "configs/tiny/ppo.yaml"), *QUIET, "--trainer.logger",
                        "false", *extra])
    finally:
        os.chdir(cwd)
    return float(cli.trainer.callback_metrics["val/score"])


def test_tiny_chain_ppo_raises_the_held_out_reward(tiny_sft_run, tmp_path):
    work = tmp_path / "chain"
    shutil.copytree(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged",
                    work / "output/tiny/lora-alpaca-adapter-merged")
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/rm.yaml"), *QUIET], cwd=work)
    run_cli(["merge", "--adapter_path", "output/tiny/reward_model"], cwd=work)
    assert (work / "output/tiny/reward_model-adapter-merged/reward_stats.json").is_file()

    before = held_out_score(work)  # no checkpoint: the fresh adapter is the identity, so this is the SFT policy
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/ppo.yaml")], cwd=work)
    exports = sorted((work / "output/tiny/ppo_checkpoints").glob("step_*"))
    assert [p.name for p in exports] == ["step_15", "step_30"]
    ckpt = torch.load(work / "output/tiny/checkpoints/ppo/last.ckpt", weights_only=True)
    assert ckpt["ppo"]["iteration"] == 30
    after = held_out_score(work, "--ckpt_path", "last")
    assert after > before + 0.5, (before, after)

    events = list((work / "output/tiny/ppo").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "tensors": 0}).Reload().Tags()
    for tag in ["rollout/score", "rollout/kl", "rollout/response_length", "rollout/eos_fraction", "ppo/policy_loss",
                "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/ratio", "ppo/kl_coef",
                "ppo/explained_variance", "val/score"]:
        assert tag in tags["scalars"], tag
    assert any("samples/rollout" in t for t in tags["tensors"])


def test_tiny_ppo_ddp_two_cpu_processes(tiny_sft_run, tmp_path):
    """Each rank generates its own rollouts, gradients are averaged, rank 0 writes one set of exports."""
    from alpaca_rlhf.modules.scorers import TokenSetScorer  # noqa: F401  (the class_path below)

    work = tmp_path / "ddp"
    shutil.copytree(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged",
                    work / "output/tiny/lora-alpaca-adapter-merged")
    # a rule-based scorer from YAML instead of a reward model: no RM stage needed here
    (work / "rule.yaml").write_text(
        "model:\n  init_args:\n    scorer:\n      class_path: alpaca_rlhf.modules.scorers.TokenSetScorer\n"
        "      init_args: {words: [the, a, and]}\n")
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/ppo.yaml"), "--config", "rule.yaml",
             "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
             "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0"],
            cwd=work)
    exports = sorted(p.name for p in (work / "output/tiny/ppo_checkpoints").iterdir())
    assert exports == ["step_3"]
    ckpt = torch.load(work / "output/tiny/checkpoints/ppo/last.ckpt", weights_only=True)
    assert ckpt["ppo"]["iteration"] == 3
