"""The recipe on the real SmolLM2-135M-Instruct through the real CLI: a few steps per stage (slow; skips without
../shared/models and ../shared/data)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, SHARED_DATA, run_cli

pytestmark = pytest.mark.slow

ALPACA = SHARED_DATA / "alpaca/alpaca_5000.json"
HH = SHARED_DATA / "hh-rlhf-harmless/test.jsonl.gz"


def smol_pipeline_yaml(gguf, work) -> str:
    """configs/smol/pipeline.yaml cut to a few steps per stage, with absolute paths to the shared files."""
    sft = ["--model.init_args.model.name_or_path", str(gguf), "--data.init_args.data_path", str(ALPACA),
           "--data.init_args.max_records", "40", "--data.init_args.val_set_size", "4", "--data.init_args.batch_size",
           "2", "--data.init_args.cutoff_len", "96", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    # 300 records: each stage takes its part of the one split (rm ~35%, rl ~25%, heldout and eval ~10% each)
    rm = ["--data.init_args.data_path", str(HH), "--data.init_args.max_records", "300", "--data.init_args.val_set_size",
          "4", "--data.init_args.batch_size", "2", "--data.init_args.max_length", "96", "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2"]
    ppo = ["--data.init_args.data_path", str(HH), "--data.init_args.max_records", "300",
           "--data.init_args.val_set_size", "2", "--data.init_args.batch_size", "2",
           "--data.init_args.max_prompt_length", "96", "--trainer.max_steps", "2",
           "--model.init_args.generation.max_new_tokens", "8", "--model.init_args.save_freq", "0",
           "--model.init_args.ppo.ppo_epochs", "2"]
    compare = ["--prompts.max_prompts", "2", "--sampling.max_new_tokens", "8", "--samples_per_prompt", "1",
               "--llm_judge_pairs", "4", "--examples", "2"]
    cfg = {"output_dir": "output/smol", "stages": {
        "sft": {"config": str(ROOT / "configs/smol/sft.yaml"), "overrides": sft},
        "rm": {"config": str(ROOT / "configs/smol/rm.yaml"), "overrides": rm},
        "ppo": {"config": str(ROOT / "configs/smol/ppo.yaml"), "overrides": ppo},
        "judge": {"config": [str(ROOT / "configs/smol/rm.yaml"), str(ROOT / "configs/smol/judge.yaml")],
                  "overrides": rm},
        "compare": {"config": str(ROOT / "configs/smol/compare.yaml"), "overrides": compare}}}
    path = work / "pipeline.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def test_smol_pipeline_few_steps_through_the_cli(smol_gguf, tmp_path):
    if not (ALPACA.is_file() and HH.is_file()):
        pytest.skip(f"real-data test: {ALPACA} or {HH} is absent")
    proc = run_cli(["pipeline", "--config", smol_pipeline_yaml(smol_gguf, tmp_path)], cwd=tmp_path, timeout=1500)
    assert proc.stdout.count("... done") == 8, proc.stdout
    out = tmp_path / "output/smol"
    summary = json.loads((out / "compare/summary.json").read_text())["summary"]
    assert set(summary["stages"]) == {"base", "sft", "rlhf"} and "judge_win_rate" in summary["rlhf_vs_sft"]
    assert all(s["judge_mean"] is not None for s in summary["stages"].values())
    lo, hi = summary["rlhf_vs_sft"]["win_rate_ci95"]
    assert lo <= summary["rlhf_vs_sft"]["win_rate"] <= hi
    adapter = json.loads((out / "lora-alpaca/adapter_config.json").read_text())
    assert {"q_proj", "down_proj"} <= set(adapter["target_modules"]) and "lm_head" not in adapter["target_modules"]
    template = json.loads((out / "lora-alpaca/template.json").read_text())
    assert template["chat"] is True
    # the merged SFT folder is a plain checkpoint with the real vocabulary, and generate answers from each stage
    merged = json.loads((out / "lora-alpaca-adapter-merged/config.json").read_text())
    assert merged["vocab_size"] == 49152 and "quantization_config" not in merged
    export = next((out / "ppo_checkpoints").glob("step_*"))
    answer = run_cli(["generate", "--mode", "ppo", "--ppo_model_path", str(export), "--instruction",
                      "Give three tips for staying healthy.", "--max_new_tokens", "12", "--temperature", "0",
                      "--stream", "false"], cwd=tmp_path).stdout
    assert answer.strip()
    # GRPO on the same real SFT model and reward model, two iterations, 4 samples per prompt (RLOO runs the same
    # shared rollout and loop; it goes through the CLI in tests/e2e/test_ppo_chain.py on the tiny model)
    for algo in ("grpo",):
        run_cli(["fit", "--config", str(ROOT / f"configs/smol/{algo}.yaml"), "--data.init_args.data_path", str(HH),
                 "--data.init_args.max_records", "300", "--data.init_args.val_set_size", "2",
                 "--data.init_args.max_prompt_length", "96", "--trainer.max_steps", "4",
                 "--model.init_args.generation.max_new_tokens", "8", "--model.init_args.save_freq", "0",
                 f"--model.init_args.{algo}.num_iterations", "2"], cwd=tmp_path)
        state = json.loads((out / f"{algo}_checkpoints/step_2/ppo_state.json").read_text())
        assert state["algorithm"] == algo and state["finished"] is True and state["samples_per_prompt"] == 4
        events = next((out / algo / "run").glob("events.out.tfevents.*"))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0}).Reload()
        assert [e.step for e in acc.Scalars("rollout/score")] == [0, 1]
        assert {f"{algo}/loss", f"{algo}/clip_ratio/region_mean", "rollout/kl"} <= set(acc.Tags()["scalars"])


def test_lm_head_adapter_merges_exactly_into_tied_smollm2(smol_folder, tmp_path):
    """SmolLM2 ties its embeddings: an lm_head adapter merged into the shared matrix was off by 0.14."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alpaca_rlhf.models import LoraSpec, ModelSpec, apply_lora, load_causal_lm, merge_adapter

    model = apply_lora(load_causal_lm(ModelSpec(name_or_path=str(smol_folder))),
                       LoraSpec(r=4, target_modules=["q_proj", "lm_head"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    ids = torch.tensor([[1, 504, 3458, 314, 1123, 28, 2]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol_folder),
                                             tmp_path / "adapter").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
