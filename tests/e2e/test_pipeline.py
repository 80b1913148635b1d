"""The pipeline: wiring, skipping, resuming, stopping on a failed stage, and the tiny default end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from alpaca_rlhf.pipeline import (
    CompareStage,
    FitStage,
    MergeStage,
    Stages,
    invalidate,
    is_done,
    plan,
    ppo_final_export,
)


def tiny_stages(**changes) -> Stages:
    stages = Stages(sft=FitStage("configs/tiny/sft.yaml"), rm=FitStage("configs/tiny/rm.yaml"),
                    ppo=FitStage("configs/tiny/ppo.yaml"))
    stages.compare.config = "configs/tiny/compare.yaml"
    for name, value in changes.items():
        setattr(stages, name, value)
    return stages


def _touch(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_outputs(root: Path, upto: str, only: bool = False) -> None:
    """Lays out the files by which each stage up to `upto` (or, with `only`, that stage alone) counts as done."""
    out = root / "output/tiny"
    files = {
        "sft": ["lora-alpaca/adapter_model.safetensors", "lora-alpaca/adapter_config.json"],
        "merge_sft": ["lora-alpaca-adapter-merged/config.json"],
        "rm": ["reward_model/adapter_model.safetensors", "reward_model/adapter_config.json",
               "reward_model/reward_stats.json"],
        "merge_rm": ["reward_model-adapter-merged/config.json"],
        "ppo": ["ppo_checkpoints/step_21/adapter_config.json", "ppo_checkpoints/step_21/ppo_state.json"],
        "compare": ["compare/report.md", "compare/summary.json"],
    }
    for name, paths in files.items():
        if only and name != upto:
            continue
        for p in paths:
            _touch(out / p)
        if name == "ppo":
            _touch(out / "logs/ppo.done.json", json.dumps({"export": str(out / "ppo_checkpoints/step_21")}))
        if name == upto:
            return


def test_plan_wires_each_output_into_the_next_stage():
    stages, paths = plan(tiny_stages())
    by_name = {s.name: s.args for s in stages}
    assert [s.name for s in stages] == ["sft", "merge_sft", "rm", "merge_rm", "ppo", "compare"]
    merged_sft = "output/tiny/lora-alpaca-adapter-merged"
    merged_rm = "output/tiny/reward_model-adapter-merged"
    assert by_name["merge_sft"][:3] == ["merge", "--adapter_path", "output/tiny/lora-alpaca"]
    rm = " ".join(by_name["rm"])
    assert f"--model.init_args.model.name_or_path {merged_sft}" in rm
    ppo = " ".join(by_name["ppo"])
    assert f"--model.init_args.model.name_or_path {merged_sft}" in ppo
    assert f"--model.init_args.scorer.init_args.model.name_or_path {merged_rm}" in ppo
    compare = " ".join(by_name["compare"])
    for arg in (f"--sft_model {merged_sft}", f"--reward_model {merged_rm}", "--base_model output/tiny/base",
                "--rlhf_model output/tiny/ppo_checkpoints", "--prompts.max_prompt_length 128",
                "--ppo_log_dir output/tiny/ppo/run"):
        assert arg in compare
    assert paths["report"] == Path("output/tiny/compare/report.md")


def test_plan_wires_configs_that_use_the_old_names(tmp_path):
    """A config written before every stage said `model` and `output_dir` (PPO's `policy`, SFT's `adapter_dir`):
    the pipeline reads its export folder and wires the merged SFT model into the key it uses."""
    for name, old, new in (("sft", "adapter_dir:", "output_dir:"), ("ppo", "policy:", "model:")):
        text = re.sub(f"^    {new}", f"    {old}", (ROOT / f"configs/tiny/{name}.yaml").read_text(), flags=re.M)
        (tmp_path / f"{name}.yaml").write_text(text.replace("_base_: shared.yaml",
                                                            f"_base_: {ROOT}/configs/tiny/shared.yaml"))
    stages, _ = plan(tiny_stages(sft=FitStage(str(tmp_path / "sft.yaml")), ppo=FitStage(str(tmp_path / "ppo.yaml"))))
    by_name = {s.name: " ".join(s.args) for s in stages}
    assert by_name["merge_sft"].startswith("merge --adapter_path output/tiny/lora-alpaca ")
    assert "--model.init_args.policy.name_or_path output/tiny/lora-alpaca-adapter-merged" in by_name["ppo"]


def test_real_pipeline_wires_the_real_paths():
    stages, _ = plan(Stages())
    ppo = " ".join(next(s.args for s in stages if s.name == "ppo"))
    assert "--model.init_args.model.name_or_path output/lora-alpaca-adapter-merged" in ppo
    assert "output/reward_model_Llama-3.1-8B_100_2e-05-adapter-merged" in ppo


def test_overrides_follow_the_wiring_and_win():
    my_rm = FitStage("configs/tiny/rm.yaml", ["--model.init_args.adapter_dir", "output/tiny/my_rm"])
    stages = tiny_stages(rm=my_rm)
    planned, _ = plan(stages)
    by_name = {s.name: s for s in planned}
    assert by_name["rm"].args[-2:] == ["--model.init_args.adapter_dir", "output/tiny/my_rm"]
    assert by_name["merge_rm"].args[2] == "output/tiny/my_rm"
    assert "output/tiny/my_rm-adapter-merged" in " ".join(by_name["ppo"].args)


@pytest.mark.parametrize("spelling", ["init_args", "short", "stacked_yaml"])
def test_the_pipeline_reads_overrides_as_the_stage_does(tmp_path, spelling):
    """`--model.adapter_dir X`, `--model.init_args.adapter_dir X` and a stacked `model: {adapter_dir: X}` all move
    the SFT output, so the pipeline checks, merges and wires the folder the stage really writes."""
    new = "output/tiny/lora-alpaca-v2"
    if spelling == "stacked_yaml":
        extra = tmp_path / "mine.yaml"
        extra.write_text(f"model:\n  adapter_dir: {new}\ndata:\n  val_set_size: 32\n")
        sft = FitStage(["configs/tiny/sft.yaml", str(extra)])
    else:
        key = "--model.init_args.adapter_dir" if spelling == "init_args" else "--model.adapter_dir"
        sft = FitStage("configs/tiny/sft.yaml", [key, new])
    planned, paths = plan(tiny_stages(sft=sft))
    by_name = {s.name: s for s in planned}
    assert by_name["sft"].output == Path(new)
    assert by_name["merge_sft"].args[1:5] == ["--adapter_path", new, "--output_dir", new + "-adapter-merged"]
    assert f"{new}-adapter-merged" in " ".join(by_name["ppo"].args) and paths["sft"] == Path(new + "-adapter-merged")


def test_compare_gets_ppos_own_split_arguments():
    ppo = FitStage("configs/tiny/ppo.yaml", ["--data.max_records", "200", "--data.skip_bad_records", "true"])
    planned, _ = plan(tiny_stages(ppo=ppo))
    compare = " ".join(next(s.args for s in planned if s.name == "compare"))
    assert "--prompts.max_records 200" in compare and "--prompts.skip_bad_records true" in compare


def test_local_paths_keep_their_spelling():
    sft = FitStage("configs/tiny/sft.yaml", ["--model.adapter_dir", "./runs/sft"])
    planned, _ = plan(tiny_stages(sft=sft))
    assert "--model.init_args.model.name_or_path ./runs/sft-adapter-merged" in " ".join(planned[2].args)


def test_wiring_arguments_are_accepted_by_the_stage_configs(capsys):
    from cli import cli_main

    stages, _ = plan(tiny_stages(merge_sft=MergeStage(output_dir="output/wired-sft"),
                                 merge_rm=MergeStage(output_dir="output/wired-rm")))
    expected = {"rm": ["name_or_path: output/wired-sft"],
                "ppo": ["name_or_path: output/wired-sft", "name_or_path: output/wired-rm"]}
    for stage in stages:
        if stage.name in expected:
            with pytest.raises(SystemExit) as exit_info:
                cli_main([*stage.args, "--print_config"])
            assert exit_info.value.code in (0, None), stage.name
            printed = capsys.readouterr().out
            assert all(text in printed for text in expected[stage.name]), stage.name


def test_rerun_skips_finished_stages(tmp_path, monkeypatch, capsys):
    from cli import cli_main

    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "compare")
    cli_main(["pipeline", "--config", str(ROOT / "configs/tiny/pipeline.yaml")])
    out = capsys.readouterr().out
    assert out.count("skipped") == 6 and "running" not in out
    assert "pipeline finished" in out and "nothing to do" in out
    assert not (tmp_path / "output/tiny/logs/sft.log").exists()


def test_interrupted_stage_resumes_and_later_stages_rerun(tmp_path, monkeypatch, capsys):
    from cli import cli_main

    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "compare")
    for p in (tmp_path / "output/tiny/reward_model").iterdir():
        p.unlink()  # the RM was killed before its export ...
    _touch(tmp_path / "output/tiny/checkpoints/rm/last.ckpt")  # ... after a checkpoint
    cli_main(["pipeline", "--config", str(ROOT / "configs/tiny/pipeline.yaml"), "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines.pop(0) == "checking the stages' configs ..."
    assert "skipped" in lines[0] and "skipped" in lines[1]
    assert "would run (resuming from output/tiny/checkpoints/rm/last.ckpt)" in lines[2]
    assert lines[2].endswith("--ckpt_path last")
    assert all("would run" in line and "--ckpt_path" not in line for line in lines[3:6])


def test_a_bad_stage_config_stops_the_pipeline_before_anything_runs(tmp_path, monkeypatch, capsys):
    from cli import cli_main

    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "merge_sft")
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        (ROOT / "configs/tiny/pipeline.yaml").read_text()
        .replace("config: configs/tiny/rm.yaml",
                 "config: configs/tiny/rm.yaml\n    overrides: [--model.init_args.nope, '1']"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", "--config", str(config)])
    message = str(exit_info.value.code)
    assert message.startswith("pipeline stopped before running anything: stage 'rm'") and "nope" in message
    assert not Path("output/tiny/logs").exists() and "running" not in capsys.readouterr().out


def test_a_failed_stage_stops_the_pipeline_naming_it(tmp_path, monkeypatch, capsys):
    from cli import cli_main

    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "merge_sft")
    # the config parses, but the merged SFT model is a fake ({} config.json): the stage itself fails
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", "--config", str(ROOT / "configs/tiny/pipeline.yaml"), "--from_stage", "rm"])
    log = Path("output/tiny/logs/rm.log")
    assert str(exit_info.value.code) == f"pipeline stopped: stage 'rm' failed (exit 1); see {log}"
    assert "lora-alpaca-adapter-merged" in log.read_text()
    assert not Path("output/tiny/logs/merge_rm.log").exists()  # nothing after the failed stage ran
    assert "[3/6] rm ... running" in capsys.readouterr().out


def test_ppo_is_done_only_with_a_finished_export(tmp_path):
    stages, _ = plan(tiny_stages())
    ppo = next(s for s in stages if s.name == "ppo")
    ppo.output = tmp_path / "ppo"
    logs = tmp_path / "logs"
    _touch(ppo.output / "step_15/adapter_config.json")
    _touch(ppo.output / "step_15/ppo_state.json", json.dumps({"iteration": 15}))
    assert not is_done(ppo, logs)  # an intermediate export of an unfinished run
    _touch(logs / "ppo.done.json", json.dumps({"export": str(ppo.output / "step_15")}))
    assert is_done(ppo, logs)
    _touch(ppo.output / "step_21/adapter_config.json")
    _touch(ppo.output / "step_21/ppo_state.json", json.dumps({"iteration": 21, "finished": True}))
    assert ppo_final_export(ppo.output, logs / "none.json") == ppo.output / "step_21"


def test_force_removes_the_previous_output_and_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "compare")
    _touch(tmp_path / "output/tiny/checkpoints/sft/last.ckpt")
    _touch(tmp_path / "output/tiny/checkpoints/sft/step20.ckpt")
    stages, _ = plan(tiny_stages())
    logs = Path("output/tiny/logs")
    removed = {str(p) for s in stages for p in invalidate(s, logs)}
    assert {"output/tiny/lora-alpaca", "output/tiny/checkpoints/sft/last.ckpt",
            "output/tiny/compare/report.md", "output/tiny/ppo_checkpoints/step_21"} <= removed
    assert Path("output/tiny/checkpoints/sft/step20.ckpt").exists()  # only what decides done / resume goes
    assert not any(is_done(s, logs) for s in stages)


@pytest.mark.slow
def readme_first_screen() -> tuple[str, str]:
    """The README's two opening commands: (install and run the main job, run the tests)."""
    block = (ROOT / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    install, tests = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return install, tests


def test_the_readme_opens_with_the_install_the_main_job_and_the_test_command_ci_runs():
    install, tests = readme_first_screen()
    assert install.startswith('python3 -m venv .venv && . .venv/bin/activate && '
                              'pip install "torch==2.13.0" -e ".[dev]"')
    assert install.split(" && ")[-1] == "alpaca-rlhf pipeline --config configs/tiny/pipeline.yaml"
    assert tests.split("#")[0].strip().removeprefix("python ") in (ROOT / ".ci/run").read_text()


def test_tiny_pipeline_end_to_end_then_rerun_skips(tmp_path):
    """The README's main job, typed as its first screen says (the installed `alpaca-rlhf` command, in an empty
    folder: the config name resolves to the packaged one), then run again."""
    import shlex
    import subprocess
    import sys

    start = time.time()
    config = str(ROOT / "configs/tiny/pipeline.yaml")
    command = shlex.split(readme_first_screen()[0].split(" && ")[-1])
    assert command[0] == "alpaca-rlhf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALPACA_RLHF_PROGRESS_EVERY": "2"}  # a progress line every 2 s
    proc = subprocess.run([str(Path(sys.executable).parent / "alpaca-rlhf"), *command[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    seconds = time.time() - start
    out = tmp_path / "output/tiny"
    assert proc.stdout.startswith("checking the stages' configs ...")
    # each fit stage's own progress: step of total, its loss or score, and an ETA, read from the stage itself
    for name, metric in (("sft", "loss"), ("rm", "loss"), ("ppo", "score")):
        progress = json.loads((out / "logs" / f"{name}.progress.json").read_text())
        assert progress["step"] == progress["total"] > 0 and metric in progress["metrics"], progress
        tag = f"[{ {'sft': 1, 'rm': 3, 'ppo': 5}[name]}/6] {name} "
        assert any(line.startswith(tag) and " step " in line and "ETA" in line and metric in line
                   for line in proc.stdout.splitlines()), (name, proc.stdout)
    for i, name in enumerate(["sft", "merge_sft", "rm", "merge_rm", "ppo", "compare"], start=1):
        assert f"[{i}/6] {name} ... done" in proc.stdout
        assert (out / "logs" / f"{name}.log").is_file()
    assert "report:      output/tiny/compare/report.md" in proc.stdout
    assert "tensorboard --logdir output/tiny" in proc.stdout
    summary = json.loads((out / "compare/summary.json").read_text())["summary"]
    stages = summary["stages"]
    assert set(stages) == {"base", "sft", "rlhf"}
    assert stages["sft"]["follows_template"] > stages["base"]["follows_template"]  # SFT learned the format
    assert stages["rlhf"]["score_mean"] > stages["sft"]["score_mean"]  # PPO raised the held-out reward
    report = (out / "compare/report.md").read_text()
    assert "Win rate of RLHF over SFT" in report
    # the PPO curves come from the run's own TensorBoard folder, named in the export's ppo_state.json
    assert "](ppo_curves.png)" in report and (out / "compare/ppo_curves.png").stat().st_size > 1000
    export = ppo_final_export(out / "ppo_checkpoints", out / "logs/ppo.done.json")
    assert export is not None and (export / "adapter_model.safetensors").is_file()
    print(f"tiny pipeline: {seconds:.0f} s on {os.cpu_count()} cores")

    again = run_cli(["pipeline", "--config", config], cwd=tmp_path)
    assert again.stdout.count("skipped") == 6 and "win rate of RLHF over SFT" in again.stdout
    ledger = json.loads((out / "logs/time.json").read_text())  # the whole run's time over both invocations
    assert ledger["invocations"] == 2 and set(ledger["stages"]) == {"sft", "merge_sft", "rm", "merge_rm", "ppo",
                                                                    "compare"}
    assert "the whole run: " in again.stdout and "over 2 invocation(s)" in again.stdout


def test_the_rl_stage_is_the_configs_algorithm_dpo_needs_no_reward_model(capsys):
    from alpaca_rlhf.pipeline import FitStage, Stages

    stages, paths = plan(Stages(sft=FitStage(str(ROOT / "configs/tiny/sft.yaml")),
                                rm=FitStage(str(ROOT / "configs/tiny/rm.yaml")),
                                ppo=FitStage(str(ROOT / "configs/tiny/dpo.yaml")),
                                compare=CompareStage(str(ROOT / "configs/tiny/compare.yaml"))))
    by_name = {s.name: s for s in stages}
    assert [s.name for s in stages] == ["sft", "merge_sft", "rm", "merge_rm", "dpo", "compare"]
    dpo = " ".join(by_name["dpo"].args)
    assert "--model.init_args.model.name_or_path output/tiny/lora-alpaca-adapter-merged" in dpo
    assert by_name["dpo"].output == Path("output/tiny/lora-dpo")
    compare = " ".join(by_name["compare"].args)
    assert "--rlhf_model output/tiny/lora-dpo" in compare and "--ppo_log_dir" not in compare
    assert "--prompts.max_prompt_length" not in compare  # DPO's data are pairs: compare keeps its own prompts
    no_rm, _ = plan(Stages(sft=FitStage(str(ROOT / "configs/tiny/sft.yaml")), rm=None,
                           ppo=FitStage(str(ROOT / "configs/tiny/dpo.yaml")),
                           compare=CompareStage(str(ROOT / "configs/tiny/compare.yaml"))))
    assert [s.name for s in no_rm] == ["sft", "merge_sft", "dpo", "compare"]
    assert "--reward_model" not in " ".join(no_rm[-1].args)
    with pytest.raises(SystemExit, match="no rm stage"):
        plan(Stages(sft=FitStage(str(ROOT / "configs/tiny/sft.yaml")), rm=None,
                    ppo=FitStage(str(ROOT / "configs/tiny/ppo.yaml"))))


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rloo_or_grpo_takes_ppos_place_with_ppos_wiring(algo):
    from alpaca_rlhf.pipeline import FitStage, Stages

    tiny = lambda name: FitStage(str(ROOT / f"configs/tiny/{name}.yaml"))  # noqa: E731
    stages, paths = plan(Stages(sft=tiny("sft"), rm=tiny("rm"), **{algo: tiny(algo)},
                                compare=CompareStage(str(ROOT / "configs/tiny/compare.yaml"))))
    assert [s.name for s in stages] == ["sft", "merge_sft", "rm", "merge_rm", algo, "compare"]
    by_name = {s.name: s for s in stages}
    rl = " ".join(by_name[algo].args)
    assert "--model.init_args.model.name_or_path output/tiny/lora-alpaca-adapter-merged" in rl
    assert "--model.init_args.scorer.init_args.model.name_or_path output/tiny/reward_model-adapter-merged" in rl
    assert by_name[algo].output == Path(f"output/tiny/{algo}_checkpoints") and paths["rl"] == algo
    compare = " ".join(by_name["compare"].args)
    assert f"--rlhf_model output/tiny/{algo}_checkpoints" in compare
    assert f"--ppo_log_dir output/tiny/{algo}/run" in compare
    assert "--prompts.max_prompt_length 128" in compare  # the RL stage's own held-out prompts


def test_the_rl_entry_must_run_its_algorithm():
    from alpaca_rlhf.pipeline import FitStage, Stages

    tiny = lambda name: FitStage(str(ROOT / f"configs/tiny/{name}.yaml"))  # noqa: E731
    with pytest.raises(SystemExit, match="stage 'grpo' runs alpaca_rlhf.modules.RLOOModule, a RLOO module"):
        plan(Stages(sft=tiny("sft"), rm=tiny("rm"), grpo=tiny("rloo")))
    with pytest.raises(SystemExit, match="give one RL stage, got rloo, dpo"):
        plan(Stages(sft=tiny("sft"), rm=tiny("rm"), rloo=tiny("rloo"), dpo=tiny("dpo")))
    stages, _ = plan(Stages(sft=tiny("sft"), rm=tiny("rm"), ppo=tiny("grpo")))  # `ppo:` runs what its config says
    assert stages[4].name == "grpo"


def test_from_stage_names_the_rl_stage_whichever_algorithm(tmp_path, monkeypatch, capsys):
    """`--from_stage ppo` on a GRPO pipeline reruns GRPO and compare, not nothing."""
    from alpaca_rlhf.pipeline import pipeline

    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "merge_rm")
    _touch(tmp_path / "output/tiny/grpo_checkpoints/step_30/ppo_state.json", json.dumps({"finished": True}))
    stages = Stages(sft=FitStage(str(ROOT / "configs/tiny/sft.yaml")), rm=FitStage(str(ROOT / "configs/tiny/rm.yaml")),
                    grpo=FitStage(str(ROOT / "configs/tiny/grpo.yaml")),
                    compare=CompareStage(str(ROOT / "configs/tiny/compare.yaml")))
    pipeline(stages, output_dir="output/tiny", dry_run=True)
    assert "grpo ... skipped" in capsys.readouterr().out  # its finished export counts
    pipeline(stages, output_dir="output/tiny", from_stage="ppo", dry_run=True)
    out = capsys.readouterr().out
    assert "merge_rm ... skipped" in out and "grpo ... would run" in out and "compare ... would run" in out


def test_from_stage_naming_a_stage_this_pipeline_lacks_is_refused_with_its_stages(tmp_path, monkeypatch):
    """`--from_stage judge` on a pipeline without a judge once did nothing and said nothing."""
    from alpaca_rlhf.pipeline import PipelineError, pipeline

    monkeypatch.chdir(tmp_path)
    fake_outputs(tmp_path, "merge_rm")
    stages = Stages(sft=FitStage(str(ROOT / "configs/tiny/sft.yaml")), rm=FitStage(str(ROOT / "configs/tiny/rm.yaml")),
                    ppo=FitStage(str(ROOT / "configs/tiny/ppo.yaml")),
                    compare=CompareStage(str(ROOT / "configs/tiny/compare.yaml")))
    with pytest.raises(PipelineError, match=r"'judge' is not a stage of this pipeline; its stages are sft, "
                                            r"merge_sft, rm, merge_rm, ppo, compare"):
        pipeline(stages, output_dir="output/tiny", from_stage="judge", dry_run=True)


def test_rerunning_a_deleted_merge_keeps_the_stages_trained_on_it(tmp_path, monkeypatch, capsys):
    """A merge re-run once deleted and retrained the finished RM, PPO and compare. A merge that writes the same
    bytes now leaves them as they are; one that writes other bytes reruns them."""
    import alpaca_rlhf.pipeline as pipeline_module
    from cli import cli_main

    monkeypatch.chdir(tmp_path)
    merged_weights = {"value": "the same weights"}

    def fake_run(stage, log_file, tag):  # each stage "runs" by laying out its output, as the real one would
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("ran\n")
        fake_outputs(tmp_path, stage.name, only=True)
        if stage.name == "merge_sft":
            (tmp_path / "output/tiny/lora-alpaca-adapter-merged/config.json").write_text(merged_weights["value"])
        return 0, 0.1

    monkeypatch.setattr(pipeline_module, "run_stage", fake_run)
    monkeypatch.setattr(pipeline_module, "newest_export",
                        lambda out, since: tmp_path / "output/tiny/ppo_checkpoints/step_21")
    config = ["pipeline", "--config", str(ROOT / "configs/tiny/pipeline.yaml")]
    cli_main(config)
    assert capsys.readouterr().out.count("... done") == 6
    shutil.rmtree(tmp_path / "output/tiny/lora-alpaca-adapter-merged")  # the user deletes the merged SFT model
    cli_main(config)
    out = capsys.readouterr().out
    assert "merge_sft ... done" in out and out.count("... done") == 1, out
    for name in ("rm", "merge_rm", "ppo", "compare"):
        assert f"{name} ... skipped" in out and "(its inputs are unchanged)" in out, name
    shutil.rmtree(tmp_path / "output/tiny/lora-alpaca-adapter-merged")
    merged_weights["value"] = "other weights"  # a merge that writes other bytes: everything after it reruns
    cli_main(config)
    out = capsys.readouterr().out
    assert out.count("... done") == 5 and "rm ... running (removed previous" in out, out
