"""The SFT stage as a user runs it: the real `python cli.py` in a subprocess, on the tiny config."""

import os
from pathlib import Path

import pytest
import torch
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


DDP_KILL = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: output/tiny/checkpoints/sft, every_n_train_steps: 4, save_top_k: 1, save_last: true}
    - class_path: tests.helpers.KillAtStep
      init_args: {step: 9}
"""


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_to_the_same_adapter(tmp_path):
    """2 CPU processes: 14 steps straight == killed after step 9 (last.ckpt at step 8, mid-epoch: 22 steps per
    epoch) and resumed. Lightning's DistributedSamplerWrapper used to crash here (IndexError) or skip too little."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.max_steps", "14", "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "1000",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    config = ["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), *ddp]
    run_cli([*config, "--model.init_args.adapter_dir", "straight"], cwd=tmp_path)
    (tmp_path / "output/tiny/checkpoints/sft/last.ckpt").unlink()
    (tmp_path / "kill.yaml").write_text(DDP_KILL)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, str(ROOT / "cli.py"), *config, "--config", "kill.yaml",
                             "--model.init_args.adapter_dir", "killed"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and "killed at step 9" in killed.stderr
    assert torch.load(tmp_path / "output/tiny/checkpoints/sft/last.ckpt", weights_only=False)["global_step"] == 8
    run_cli([*config, "--model.init_args.adapter_dir", "resumed", "--ckpt_path", "last"], cwd=tmp_path)
    straight = load_file(tmp_path / "straight/adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_data_and_config_errors_print_one_clear_line_through_the_real_cli(tmp_path, monkeypatch, capsys):
    """Every data error the data modules raise, and a missing earlier stage, through the command line's entry
    point: the message alone (file, record, field), exit status 1, no traceback unless ALPACA_RLHF_DEBUG=1. The
    first case runs as `python cli.py` in a fresh interpreter; the rest call the same `main` in this process
    (the same code after the interpreter's start-up, which is most of each run's time)."""
    import json
    import subprocess
    import sys

    from alpaca_rlhf.cli import main

    (tmp_path / "not_json.json").write_text("{oops")
    (tmp_path / "no_output.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    (tmp_path / "empty_output.jsonl").write_text(json.dumps({"instruction": "a", "output": " "}) + "\n")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    sft = ["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "1"]
    rm = ["fit", "--config", str(ROOT / "configs/tiny/rm.yaml"), "--model.init_args.model.name_or_path",
          "output/tiny/base", "--model.init_args.model.tiny", "{}", "--trainer.max_steps", "1"]
    cases = [
        (sft + ["--data.init_args.data_path", "not_json.json"], "not_json.json: not JSON"),
        (sft + ["--data.init_args.data_path", "no_output.json"], "no_output.json: record 1: field 'output' is missing"),
        (sft + ["--data.init_args.data_path", "empty_output.jsonl"], "record 0: field 'output' is empty"),
        (sft + ["--data.init_args.data_path", "a_folder"], "a_folder: is a folder"),
        (sft + ["--data.init_args.data_path", "missing.json"], "data file 'missing.json' not found"),
        (rm + ["--data.init_args.data_path", "pairs.jsonl", "--data.init_args.format", "auto"],
         "pairs.jsonl: cannot tell the preference format"),
        (["fit", "--config", str(ROOT / "configs/tiny/ppo.yaml")], "does not exist"),  # no earlier stage ran here
        # the data path is checked before any model loads (here the model does not exist either)
        (["fit", "--config", str(ROOT / "configs/tiny/ppo.yaml"), "--data.init_args.data_path", "gone.jsonl"],
         "data file 'gone.jsonl' not found"),
        (["fit", "--config", str(ROOT / "configs/tiny/rm.yaml"), "--data.init_args.data_path", "../no/such/dir"],
         "data folder '../no/such/dir' not found"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("ALPACA_RLHF_DEBUG", None)
    monkeypatch.delenv("ALPACA_RLHF_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    for i, (args, message) in enumerate(cases):
        if i == 0:
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            code, stderr = proc.returncode, proc.stderr
        else:
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_:
                main(args)
            code, stderr = exit_.value.code, capsys.readouterr().err
        assert code == 1, (args, stderr[-2000:])
        assert message in stderr and "Traceback" not in stderr, (args, stderr[-2000:])
        assert "alpaca-rlhf: error:" in stderr
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *cases[0][0]], cwd=tmp_path,
                          env={**env, "ALPACA_RLHF_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "not JSON" in proc.stderr


def test_a_rerun_over_a_finished_run_stops_and_says_how_to_resume_or_start_over(tmp_path, monkeypatch, capsys):
    """Issue 24 item 3: a bare `fit` rerun over a run trained from step 0 again, left `last-v1.ckpt` beside
    `last.ckpt` and replaced the adapter without a word; `merge` silently replaced a merged folder. Both now stop
    with one line naming --ckpt_path last / --overwrite."""
    from alpaca_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALPACA_RLHF_DEBUG", raising=False)
    sft = ["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "2",
           "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1000",
           "--trainer.limit_val_batches", "0"]
    ckpts, adapter = tmp_path / "output/tiny/checkpoints/sft", tmp_path / "output/tiny/lora-alpaca"
    main(sft)
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    written = sorted(p.name for p in ckpts.glob("*.ckpt"))
    assert "last.ckpt" in written
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(sft)
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "Traceback" not in err
    assert "--ckpt_path last" in err and "--overwrite" in err and "last.ckpt" in err and "lora-alpaca" in err
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == written  # nothing new written
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    main([*sft, "--overwrite", "true"])  # starts over: the old checkpoints go, no last-v1.ckpt
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == written
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns != stamp
    main([*sft[:4], "4", *sft[5:], "--ckpt_path", "last"])  # a resume is not refused
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4

    main(["merge", "--adapter_path", "output/tiny/lora-alpaca"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["merge", "--adapter_path", "output/tiny/lora-alpaca"])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    main(["merge", "--adapter_path", "output/tiny/lora-alpaca", "--overwrite", "true"])


def test_ctrl_c_saves_a_checkpoint_at_a_step_and_the_resumed_run_is_the_uninterrupted_one(tmp_path):
    """Ctrl-C (SIGINT) mid-training: the step finishes, `last.ckpt` is saved at that step, the run says how to
    resume, and `--ckpt_path last` ends with the adapter of a run never interrupted. Before, Lightning stopped
    with no checkpoint newer than the last periodic one (or none at all)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    fit = ["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.val_check_interval", "1000",
           "--trainer.limit_val_batches", "0", "--trainer.max_steps", "60"]
    run_cli([*fit, "--model.init_args.adapter_dir", "straight"], cwd=tmp_path)
    progress = tmp_path / "progress.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ALPACA_RLHF_PROGRESS": str(progress)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *fit, "--overwrite", "true"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "Ctrl-C: finishing this step" in out and "--ckpt_path last" in out, out
    step = torch.load(tmp_path / "output/tiny/checkpoints/sft/last.ckpt", weights_only=False)["global_step"]
    assert 3 <= step < 60 and f"at step {step};" in out, (step, out)  # where it stopped, not the last periodic one
    assert not (tmp_path / "output/tiny/lora-alpaca").exists()  # not exported as if finished
    run_cli([*fit, "--ckpt_path", "last"], cwd=tmp_path)
    a = load_file(tmp_path / "straight/adapter_model.safetensors")
    b = load_file(tmp_path / "output/tiny/lora-alpaca/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_and_biases_offline_as_the_logger(tmp_path):
    """W&B instead of TensorBoard, from the command line, offline (no account, no network): the run's metrics
    land in its offline run file (`wandb sync` uploads it later) and the stage still exports its adapter."""
    pytest.importorskip("wandb")
    logger = ("{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {project: alpaca-rlhf, offline: true, "
              "save_dir: output/tiny}}")
    run_cli(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "6",
             "--trainer.val_check_interval", "3", "--trainer.logger", logger], cwd=tmp_path,
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((tmp_path / "output/tiny/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = runs[0].read_bytes()
    assert b"train/loss" in logged and b"val/loss" in logged and b"val/perplexity" in logged
    assert (tmp_path / "output/tiny/lora-alpaca/adapter_model.safetensors").is_file()
