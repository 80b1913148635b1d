"""(b) The tiny chain as a user runs it: SFT -> merge -> RM -> merge -> `python cli.py fit --config
configs/tiny/ppo.yaml` in a subprocess; the reward model's mean score on held-out prompts rises."""

import shutil

import pytest
import torch
from conftest import ROOT, run_cli

from cli import cli_main

pytestmark = pytest.mark.slow
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def held_out_score(work, *extra, algo: str = "ppo") -> float:
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli = cli_main(["validate", "--config", str(ROOT / f"configs/tiny/{algo}.yaml"), *QUIET, "--trainer.logger",
                        "false", *extra])
    finally:
        os.chdir(cwd)
    return float(cli.trainer.callback_metrics["val/score"])


@pytest.fixture(scope="module")
def chain(tiny_sft_run, tmp_path_factory):
    """A work folder with the merged tiny SFT model and the tiny reward model trained and merged by the CLI."""
    work = tmp_path_factory.mktemp("chain")
    shutil.copytree(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged",
                    work / "output/tiny/lora-alpaca-adapter-merged")
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/rm.yaml"), *QUIET], cwd=work)
    run_cli(["merge", "--adapter_path", "output/tiny/reward_model"], cwd=work)
    return work


def test_tiny_chain_ppo_raises_the_held_out_reward(chain):
    work = chain
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

    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    # one point per iteration on one x-axis, whether Lightning's self.log or the direct logger call wrote it
    assert [e.step for e in acc.Scalars("ppo/policy_loss")] == [e.step for e in acc.Scalars("rollout/score")]
    assert [e.step for e in acc.Scalars("rollout/score")] == list(range(30))
    for tag in ["rollout/score", "rollout/kl", "rollout/response_length", "rollout/eos_fraction", "ppo/policy_loss",
                "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/ratio", "ppo/kl_coef",
                "ppo/explained_variance", "val/score"]:
        assert tag in tags["scalars"], tag
    assert any("samples/rollout" in t for t in tags["tensors"])
    assert "rollout/scores" in tags["histograms"] and "hp_metric" not in tags["scalars"]
    rm = EventAccumulator(str(work / "output/tiny/rm/run"), size_guidance={"histograms": 0}).Reload().Tags()
    assert {"val/scores_chosen", "val/scores_rejected"} <= set(rm["histograms"]) and "hp_metric" not in rm["scalars"]


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_tiny_chain_critic_free_raises_the_held_out_reward_and_compare_reports_it(chain, algo):
    """configs/tiny/{rloo,grpo}.yaml as a user runs them on the same SFT model and reward model as PPO: the held-out
    reward rises, TensorBoard has TRL's metric names, and compare takes the export as the RLHF stage."""
    import json

    work = chain
    before = held_out_score(work, algo=algo)
    run_cli(["fit", "--config", str(ROOT / f"configs/tiny/{algo}.yaml"), *QUIET], cwd=work)
    exports = sorted((work / f"output/tiny/{algo}_checkpoints").glob("step_*"))
    assert [p.name for p in exports] == ["step_15", "step_30"]
    state = json.loads((exports[-1] / "ppo_state.json").read_text())
    assert state["algorithm"] == algo and state["finished"] is True
    after = held_out_score(work, "--ckpt_path", "last", algo=algo)
    assert after > before + 0.5, (before, after)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / f"output/tiny/{algo}/run"), size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("rollout/score")] == list(range(30))
    own = {"rloo": ["rloo/reward", "rloo/reward_std"], "grpo": ["grpo/kl", "grpo/frac_reward_zero_std"]}[algo]
    for tag in ["rollout/kl", "rollout/response_length", f"{algo}/loss", f"{algo}/clip_ratio/region_mean",
                f"{algo}/entropy", *own]:
        assert tag in tags, tag
    assert not any(t.startswith("ppo/") for t in tags)
    run_cli(["compare", "--config", str(ROOT / "configs/tiny/compare.yaml"), "--base_model", "null",
             "--rlhf_model", f"output/tiny/{algo}_checkpoints", "--prompts.max_prompts", "8",
             "--report_dir", f"cmp_{algo}"], cwd=work)
    summary = json.loads((work / f"cmp_{algo}/summary.json").read_text())["summary"]
    assert set(summary["stages"]) == {"sft", "rlhf"} and summary["kl_rlhf_to_sft"]["mean"] > 0


def short_rule_run(tiny_sft_run, work, iterations: int, extra_yaml: str, *args, timeout: int = 600):
    """`fit` of configs/tiny/ppo.yaml for a few iterations with a rule-based scorer from YAML instead of the
    reward model (no RM stage needed), plus `extra_yaml` under `model.init_args`; returns the work folder."""
    shutil.copytree(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged",
                    work / "output/tiny/lora-alpaca-adapter-merged")
    (work / "override.yaml").write_text(
        "model:\n  init_args:\n    scorer:\n      class_path: alpaca_rlhf.modules.scorers.TokenSetScorer\n"
        "      init_args: {words: [the, a, and]}\n" + extra_yaml)
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/ppo.yaml"), "--config", "override.yaml", *args,
             "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(iterations),
             "--trainer.limit_val_batches", "0"], cwd=work, timeout=timeout)
    return work


def test_tiny_ppo_ddp_two_cpu_processes(tiny_sft_run, tmp_path):
    """Each rank generates its own rollouts, gradients are averaged, rank 0 writes one set of exports; early
    stopping is decided on the all-reduced KL, so both ranks stop at the same epoch (no hang)."""
    # one minibatch: the rollout forward is reused for the first step
    ppo = "    ppo: {mini_batch_size: null, ppo_epochs: 3, early_stopping: true, target_kl: 0.0}\n"
    work = short_rule_run(tiny_sft_run, tmp_path / "ddp", 3, ppo,
                          "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    exports = sorted(p.name for p in (work / "output/tiny/ppo_checkpoints").iterdir())
    assert exports == ["step_3"]
    ckpt = torch.load(work / "output/tiny/checkpoints/ppo/last.ckpt", weights_only=True)
    assert ckpt["ppo"]["iteration"] == 3


def test_value_head_and_scorer_swap_from_yaml(tiny_sft_run, tmp_path):
    """A researcher's swap without forking: a rule-based scorer and a separate critic, by class_path."""
    from safetensors.torch import load_file

    work = short_rule_run(tiny_sft_run, tmp_path / "swap", 2,
                          "    value_head:\n      class_path: alpaca_rlhf.modules.policy.SeparateCritic\n"
                          "      init_args:\n        model: {name_or_path: output/tiny/lora-alpaca-adapter-merged}\n"
                          "        lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}\n", *QUIET)
    ckpt = torch.load(work / "output/tiny/checkpoints/ppo/last.ckpt", weights_only=True)
    critic = [k for k in ckpt["state_dict"] if k.startswith("policy.value_head.")]
    assert any("lora_A" in k for k in critic) and "policy.value_head.summary.weight" in critic
    assert not any("embed_tokens" in k for k in ckpt["state_dict"])  # still adapter-sized
    head = load_file(work / "output/tiny/ppo_checkpoints/step_2/value_head.safetensors")
    assert "summary.weight" in head and sum("lora_" in k for k in head) == 4 * 2  # 2 layers x q,v x A,B


def test_early_stopping_is_decided_alike_on_every_rank(tiny_sft_run, tmp_path):
    """2-process CPU DDP where rank 0's minibatch KL is huge and rank 1's is zero (tests.helpers.RankSkewedKLPPO):
    on the all-reduced KL both ranks stop after the first epoch of each iteration. Decided per rank, rank 0 would
    stop alone and rank 1 would wait in its next collective forever (here: the 300 s timeout)."""
    extra = ("    ppo: {mini_batch_size: null, ppo_epochs: 3, early_stopping: true, target_kl: 1.0}\n"
             "  class_path: tests.helpers.RankSkewedKLPPO\n")
    work = short_rule_run(tiny_sft_run, tmp_path / "skew", 2, extra, "--trainer.strategy", "ddp",
                          "--trainer.devices", "2", "--trainer.accelerator", "cpu", timeout=300)
    for rank in (0, 1):
        assert (work / f"epochs_rank{rank}.txt").read_text().split() == ["1", "1"], rank
