"""`kill -9` at every point a run can die, per stage, through the real `python cli.py`; then `--ckpt_path last`.

The final adapter must equal the uninterrupted run's. Kill points (tests.helpers.SigkillAt): mid-step (after a
backward, before its optimizer step), during a checkpoint write (half the bytes written), and between the last
checkpoint and the export. The pipeline resumes a stage killed under it the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

MERGED_SFT = "output/tiny/lora-alpaca-adapter-merged"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "1000"]
SCORER = json.dumps({"class_path": "alpaca_rlhf.modules.scorers.TokenIdScorer",
                     "init_args": {"token_ids": list(range(40, 200))}})

# stage: (config, checkpoint dir, steps per checkpoint, max_steps, the flag naming the export, its file, kill points)
# Every stage is killed mid-step (its own resume). The checkpoint write is the same code for every stage (one
# ModelCheckpoint, one atomic write): killed under SFT only. The kill between the last checkpoint and the export
# hits each stage's own export-on-resume (SFT's adapter, RM's adapter with its centring stats, PPO's step_<n>).
STAGES = {
    "sft": ("configs/tiny/sft.yaml", "output/tiny/checkpoints/sft", 4, 12, "--model.init_args.adapter_dir",
            "adapter_model.safetensors", {"mid_step": 6, "checkpoint_write": 8, "before_export": 0}),
    "rm": ("configs/tiny/rm.yaml", "output/tiny/checkpoints/rm", 4, 12, "--model.init_args.adapter_dir",
           "adapter_model.safetensors", {"mid_step": 6, "before_export": 0}),
    # PPO: 4 epochs x 2 minibatches = 8 optimizer steps per iteration, a checkpoint after every iteration
    "ppo": ("configs/tiny/ppo.yaml", "output/tiny/checkpoints/ppo", 8, 24, "--model.init_args.output_dir",
            "step_3/adapter_model.safetensors", {"mid_step": 13, "before_export": 0}),
}


def kill_config(ckpt_dir: str, every: int, point: str, step: int) -> str:
    return f"""
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, filename: "step{{step}}", auto_insert_metric_name: false,
                  every_n_train_steps: {every}, save_top_k: 1, save_last: true}}
    - class_path: tests.helpers.SigkillAt
      init_args: {{point: {point}, step: {step}}}
"""


def fit_args(stage: str, out: str) -> list[str]:
    config, ckpt_dir, every, max_steps, out_flag, _, _ = STAGES[stage]
    args = ["fit", "--config", str(ROOT / config), *QUIET, "--trainer.max_steps", str(max_steps), out_flag, out]
    if stage == "ppo":
        args += ["--model.init_args.scorer", SCORER, "--model.init_args.save_freq", "0"]
    return args


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_kill_9_at_every_point_then_resume_gives_the_uninterrupted_adapter(stage, tiny_sft_run, tmp_path):
    config, ckpt_dir, every, max_steps, _, export_file, kill_steps = STAGES[stage]
    if stage != "sft":
        shutil.copytree(tiny_sft_run / MERGED_SFT, tmp_path / MERGED_SFT)
    else:  # the tiny base the SFT config builds on first use: the same for every run below
        shutil.copytree(tiny_sft_run / "output/tiny/base", tmp_path / "output/tiny/base")
    (tmp_path / "ckpt.yaml").write_text(kill_config(ckpt_dir, every, "mid_step", 10**9))  # same callbacks, no kill
    run_cli([*fit_args(stage, "straight"), "--config", "ckpt.yaml"], cwd=tmp_path)
    straight = load_file(tmp_path / "straight" / export_file)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    points = list(kill_steps.items())
    for point, step in points:
        shutil.rmtree(tmp_path / ckpt_dir, ignore_errors=True)  # a new run, not a resume of the previous one
        (tmp_path / "kill.yaml").write_text(kill_config(ckpt_dir, every, point, step))
        out = f"run_{point}"
        killed = subprocess.run([sys.executable, str(ROOT / "cli.py"), *fit_args(stage, out), "--config", "kill.yaml"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert killed.returncode == -9, (point, killed.stderr[-3000:])
        assert "SigkillAt: kill -9" in killed.stderr
        assert not (tmp_path / out / export_file).exists()  # nothing exported by the killed run
        last = torch.load(tmp_path / ckpt_dir / "last.ckpt", weights_only=False)  # loads: never half-written
        expected_step = {"mid_step": (step - 1) // every * every, "checkpoint_write": step - every,
                         "before_export": max_steps}[point]
        assert last["global_step"] == expected_step, point
        if point == "checkpoint_write":  # the kill did land mid-write: a half temp file beside an intact last.ckpt
            partial = list((tmp_path / ckpt_dir).glob(".*.tmp-*"))
            assert partial and partial[0].stat().st_size > 0

        run_cli([*fit_args(stage, out), "--config", "ckpt.yaml", "--ckpt_path", "last"], cwd=tmp_path)
        resumed = load_file(tmp_path / out / export_file)
        assert resumed.keys() == straight.keys()
        for k in straight:
            torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6, msg=f"{point}: {k}")
        if stage == "ppo":
            state = json.loads((tmp_path / out / "step_3/ppo_state.json").read_text())
            assert state["finished"] is True and state["iteration"] == 3


def test_pipeline_resumes_a_stage_killed_under_it(tiny_sft_run, tmp_path):
    """The pipeline's SFT stage is killed with -9 mid-step; the pipeline stops naming it; run again, it resumes
    that stage from its last.ckpt, ends with the uninterrupted adapter, and goes on to the next stages."""
    shutil.copytree(tiny_sft_run / "output/tiny/base", tmp_path / "output/tiny/base")
    sft = [*QUIET, "--trainer.max_steps", "12"]
    (tmp_path / "ckpt.yaml").write_text(kill_config("output/tiny/checkpoints/sft", 4, "mid_step", 10**9))
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), *sft, "--config", "ckpt.yaml",
             "--model.init_args.adapter_dir", "straight"], cwd=tmp_path)
    shutil.rmtree(tmp_path / "output/tiny/checkpoints/sft")
    (tmp_path / "kill.yaml").write_text(kill_config("output/tiny/checkpoints/sft", 4, "mid_step", 6))

    def pipeline_yaml(kill: bool) -> str:
        stages = {
            "sft": {"config": [str(ROOT / "configs/tiny/sft.yaml"), "kill.yaml" if kill else "ckpt.yaml"],
                    "overrides": sft},
            "rm": {"config": str(ROOT / "configs/tiny/rm.yaml"), "overrides": [*QUIET, "--trainer.max_steps", "2"]},
            "ppo": {"config": str(ROOT / "configs/tiny/ppo.yaml"),
                    "overrides": [*QUIET, "--trainer.max_steps", "8", "--model.init_args.save_freq", "0"]},
            "compare": {"enabled": False},
        }
        path = tmp_path / ("pipeline_kill.yaml" if kill else "pipeline.yaml")
        path.write_text(json.dumps({"output_dir": "output/tiny", "stages": stages}))
        return str(path)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    stopped = subprocess.run([sys.executable, str(ROOT / "cli.py"), "pipeline", "--config", pipeline_yaml(True)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode != 0 and "stage 'sft' failed" in stopped.stderr + stopped.stdout, stopped.stderr
    assert torch.load(tmp_path / "output/tiny/checkpoints/sft/last.ckpt", weights_only=False)["global_step"] == 4

    out = run_cli(["pipeline", "--config", pipeline_yaml(False)], cwd=tmp_path, timeout=900).stdout
    assert "[1/5] sft ... running (resuming from output/tiny/checkpoints/sft/last.ckpt)" in out, out
    assert out.count("... done") == 5, out
    straight = load_file(tmp_path / "straight/adapter_model.safetensors")
    resumed = load_file(tmp_path / "output/tiny/lora-alpaca/adapter_model.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "output/tiny/ppo_checkpoints/step_1/ppo_state.json").is_file()
    assert Path(tmp_path / "output/tiny/lora-alpaca-adapter-merged/config.json").is_file()
