"""bench/gpu.py, the one-command GPU check: its 8B shape is Llama-3.1-8B's, and the whole command runs at the
tiny shape on CPU (every stage, the table, the JSON), so the day a GPU is lent it only needs `python bench/gpu.py`."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_the_8b_shape_has_llama_3_1_8b_s_parameter_count():
    import gpu
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**gpu.SHAPES["llama-3.1-8b"]))
    assert model.num_parameters() == 8_030_261_248  # meta-llama/Llama-3.1-8B's config.json shapes


def test_the_8b_shape_refuses_to_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the 8B run is bench/gpu.py's real job, not a test's")
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs a CUDA GPU; on CPU run --shape tiny" in proc.stderr


@pytest.mark.slow
def test_every_stage_runs_at_the_tiny_shape(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--shape", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"sft_bf16", "sft_8bit", "sft_4bit", "rm_4bit", "ppo_4bit"}
    assert not [name for name, r in results.items() if "error" in r], results
    for name in ("sft_bf16", "sft_8bit", "sft_4bit", "rm_4bit"):
        assert results[name]["tokens_per_s"] > 0 and results[name]["tokens"] > 0
    ppo = results["ppo_4bit"]
    assert ppo["episodes_per_s"] > 0 and 0 < ppo["generation_share"] < 1 and ppo["response_length"] > 0
    assert "| ppo_4bit |" in proc.stdout and "torchtune QLoRA" in proc.stdout
