"""A user who never cloned the repository: the built wheel in a fresh venv, run from an empty directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_wheel_in_a_fresh_venv_runs_the_tiny_pipeline_from_an_empty_directory(tmp_path):
    # the wheel, built from a copy of this checkout's sources (an in-tree build/ could hold stale files)
    import shutil

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv*", "output", "build", "dist", ".git",
                                                                "__pycache__", "*.egg-info", ".pytest_cache"))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
         str(source)], cwd=tmp_path, env=os.environ.copy())
    wheel = next(dist.glob("alpaca_rlhf-*.whl"))
    # a fresh venv; its dependencies (torch & co, gigabytes) are borrowed from this one through a .pth line, the
    # package itself comes only from the wheel
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=os.environ.copy())
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path,
                    env=os.environ.copy()).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path,
        env=os.environ.copy())

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    where = run([str(python), "-c", "import alpaca_rlhf; print(alpaca_rlhf.__file__)"], cwd=empty, env=env).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not this checkout

    command = str(venv / "bin" / "alpaca-rlhf")
    top_help = run([command, "--help"], cwd=empty, env=env).stdout
    assert "pipeline" in top_help and "init" in top_help
    run([command, "init"], cwd=empty, env=env)
    assert (empty / "configs/tiny/sft.yaml").is_file() and (empty / "configs/smol/pipeline.yaml").is_file()
    (empty / "configs").rename(empty / "my_configs")  # edited copies live anywhere; the names below are packaged

    # the tiny pipeline by the packaged configs' names, cut to a few steps, through `python -m alpaca_rlhf`
    few = ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    pipeline = {"output_dir": "output/tiny", "stages": {
        "sft": {"config": "configs/tiny/sft.yaml", "overrides": [*few, "--trainer.max_steps", "4"]},
        "rm": {"config": "tiny/rm", "overrides": [*few, "--trainer.max_steps", "4"]},
        "ppo": {"config": "configs/tiny/ppo.yaml", "overrides": [*few, "--trainer.max_steps", "8"]},
        "compare": {"config": "configs/tiny/compare.yaml",
                    "overrides": ["--prompts.max_prompts", "2", "--samples_per_prompt", "1"]}}}
    (empty / "pipeline.yaml").write_text(json.dumps(pipeline))
    out = run([str(python), "-m", "alpaca_rlhf", "pipeline", "--config", "pipeline.yaml"], cwd=empty, env=env).stdout
    assert out.count("... done") == 6, out
    assert (empty / "output/tiny/compare/report.md").is_file()
    assert (empty / "output/tiny/lora-alpaca/adapter_model.safetensors").is_file()
    # a single stage by the packaged name too
    fit_help = run([command, "fit", "--config", "tiny/sft", "--print_config"], cwd=empty, env=env).stdout
    assert "alpaca_rlhf.modules.SFTModule" in fit_help
