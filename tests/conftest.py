"""Shared fixtures: tiny LLaMA folders built from a config (random weights, local tokenizer), no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per worker and per CLI it starts, or
    os.environ["OMP_NUM_THREADS"] = "1"    # the workers' OpenMP threads spin against each other on two cores
    import torch

    torch.set_num_threads(1)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random-weight tiny LLaMA saved as a real `from_pretrained` folder."""
    from alpaca_rlhf.models import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("base") / "base", TINY, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from alpaca_rlhf.models import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(name_or_path=str(tiny_base)))


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory) -> Path:
    """A work folder where the tiny SFT config ran for 40 steps and was merged (the later stages' start)."""
    from alpaca_rlhf.models import merge_adapter
    from cli import cli_main

    work = tmp_path_factory.mktemp("sft_run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli_main(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "40",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
        merge_adapter("output/tiny/lora-alpaca")
    finally:
        os.chdir(cwd)
    return work


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Runs the real `python cli.py ...` in a subprocess; fails the test with its output if it fails."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        pytest.fail(f"cli.py {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc


SMOL_GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The shared real SmolLM2-135M-Instruct GGUF file (skips when this checkout has no ../shared/models)."""
    if not SMOL_GGUF.is_file():
        pytest.skip(f"real-model test: {SMOL_GGUF} is absent (see README: the real model)")
    return SMOL_GGUF


@pytest.fixture(scope="session")
def smol_folder(smol_gguf) -> Path:
    """SmolLM2 dequantized into a Hugging Face folder (converted once per machine, in the gguf cache)."""
    from alpaca_rlhf.models import ModelSpec, gguf_folder

    return gguf_folder(ModelSpec(name_or_path=str(smol_gguf)), str(smol_gguf))
