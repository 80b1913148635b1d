"""The memory preflight: estimates from configs alone, held against measured peaks, and the check at fit start."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

from alpaca_rlhf.cli import parse_fit_config
from alpaca_rlhf.preflight import GIB, estimate

sys.path.insert(0, str(ROOT / "bench"))


def lines(est) -> dict[str, float]:
    return {c: b for c, b, _ in est.lines}


def test_real_configs_fit_a_24_gb_card_and_each_knob_moves_the_right_component():
    llama = ["--model.init_args.model.name_or_path", "meta-llama/Llama-3.1-8B"]
    sft = estimate(parse_fit_config(["--config", str(ROOT / "configs/sft.yaml")]))
    assert {"weights", "LoRA (+ score head)", "gradients", "optimizer state", "activations", "logits"} == \
        set(lines(sft))
    assert 10 * GIB < lines(sft)["weights"] < 11 * GIB  # 8B in 8-bit; embeddings, lm_head fp32 (k-bit training)
    assert sft.total < 24 * GIB
    fp16 = estimate(parse_fit_config(["--config", str(ROOT / "configs/sft.yaml"),
                                      "--model.init_args.model.quantization", "null"]))
    assert lines(fp16)["weights"] > 14 * GIB  # 16 GB of bf16 weights
    no_ckpt = estimate(parse_fit_config(["--config", str(ROOT / "configs/sft.yaml"),
                                         "--model.init_args.model.gradient_checkpointing", "false"]))
    assert lines(no_ckpt)["activations"] > 5 * lines(sft)["activations"]
    ppo = estimate(parse_fit_config(["--config", str(ROOT / "configs/ppo.yaml"),
                                     "--model.init_args.policy.name_or_path", "meta-llama/Llama-3.1-8B",
                                     "--model.init_args.scorer.init_args.model.name_or_path",
                                     "meta-llama/Llama-3.1-8B"]), model_shape="meta-llama/Llama-3.1-8B")
    assert {"policy weights", "reward-model weights", "generation KV cache", "logits"} <= set(lines(ppo))
    assert ppo.total < 24 * GIB and "reference" not in " ".join(lines(ppo))  # the reference is the adapter off
    rm = estimate(parse_fit_config(["--config", str(ROOT / "configs/rm.yaml"), *llama]))
    assert lines(rm)["weights"] < lines(sft)["weights"]  # a one-score head instead of a 128k-row lm_head


@pytest.mark.parametrize("stage,quantization", [("sft", "none"), ("rm", "none"), ("ppo", "none"),
                                                ("sft", "8bit"), ("sft", "4bit")])
def test_the_estimate_is_within_25_percent_of_the_measured_peak_at_the_tiny_shape(stage, quantization, tmp_path,
                                                                                  monkeypatch):
    """Measured: every tensor alive at the peak of one optimizer step (PyTorch's memory profiler), worst batch.
    The quantized rows load a bf16 base in 8/4 bits: their activations are fp32 (k-bit training's residual
    stream), which the estimate counted at bf16 width before (estimate / measured was 0.71)."""
    import memory

    monkeypatch.chdir(tmp_path)
    fit_args = memory.configs("tiny", stage, tmp_path, quantization)
    cli = memory.instantiate(fit_args)
    measured = memory.measure_ppo(cli) if stage == "ppo" else memory.measure_supervised(cli, stage)
    estimated = estimate(parse_fit_config(fit_args)).total
    assert 0.75 <= estimated / measured <= 1.25, (estimated, measured)


def test_fit_refuses_a_config_over_the_budget_and_preflight_prints_the_table(tmp_path, monkeypatch, capsys):
    from alpaca_rlhf.cli import cli_main, main

    monkeypatch.chdir(tmp_path)
    sft = ["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.max_steps", "1",
           "--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as refused:
        main([*sft, "--preflight_budget_gb", "0.001"])
    assert refused.value.code == 1
    err = capsys.readouterr().err
    assert "preflight: the estimated peak" in err and "activations" in err and "--preflight warn" in err
    assert not (tmp_path / "output/tiny/lora-alpaca").exists()  # nothing trained
    cli_main([*sft, "--preflight_budget_gb", "0.001", "--preflight", "warn"])  # overridden: it trains
    assert (tmp_path / "output/tiny/lora-alpaca/adapter_model.safetensors").is_file()
    cli_main(["preflight", "-c", "tiny/sft", "--budget_gb", "24"])
    out = capsys.readouterr().out
    assert "preflight (SFT)" in out and "fits" in out and "optimizer state" in out


def test_rloo_grpo_and_dpo_are_estimated_as_what_they_run():
    """GRPO/RLOO: k completions per prompt, no value head; DPO: chosen + rejected per pair, no reward model."""
    smol = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def est(name, *extra):
        return estimate(parse_fit_config(["--config", str(ROOT / f"configs/tiny/{name}.yaml"), *extra]),
                        model_shape=smol)

    ppo, grpo = est("ppo"), est("grpo")
    assert grpo.stage == "GRPO" and "LoRA" in lines(grpo) and "LoRA + value head" in lines(ppo)
    assert lines(grpo)["LoRA"] < lines(ppo)["LoRA + value head"]
    # tiny PPO: 16 prompts x 1; tiny GRPO: 4 prompts x 4 = the same 16 completions, so the same KV cache
    assert lines(grpo)["generation KV cache"] == lines(ppo)["generation KV cache"]
    more = est("grpo", "--model.init_args.grpo.num_generations", "8")
    assert lines(more)["generation KV cache"] == 2 * lines(grpo)["generation KV cache"]
    assert est("rloo").stage == "RLOO"
    dpo = est("dpo")
    assert dpo.stage == "DPO" and "reward-model weights" not in lines(dpo)
    how = {c: h for c, _, h in dpo.lines}
    batch = parse_fit_config(["--config", str(ROOT / "configs/tiny/dpo.yaml")]).data.init_args.batch_size
    assert how["activations"].startswith(f"{2 * batch} x ")  # chosen and rejected of every pair


def test_a_config_whose_model_is_an_unwritten_stage_output_names_the_flag(tmp_path, monkeypatch, capsys):
    """Every real RM and PPO config before SFT has run failed with "not in KNOWN_SHAPES" and no word of
    --model_shape; with the flag it estimates."""
    from alpaca_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        main(["preflight", "-c", "smol/rm"])
    assert refused.value.code == 1
    err = capsys.readouterr().err
    assert "'output/smol/lora-alpaca-adapter-merged'" in err and "--model_shape" in err and "earlier stage" in err
    main(["preflight", "-c", "smol/rm", "--model_shape", "meta-llama/Llama-3.1-8B", "--budget_gb", "80"])
    assert "preflight (reward model)" in capsys.readouterr().out


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_training_weights_match_what_peft_holds_on_the_real_smollm2(smol_folder, quantization):
    """PEFT's k-bit preparation casts embeddings, lm_head and norms to fp32: held memory was 1.35x (8-bit) and
    1.44x (4-bit) the preflight's weights line for a bf16 SmolLM2; now within 5%."""
    import torch

    from alpaca_rlhf.models import ModelSpec, load_causal_lm
    from alpaca_rlhf.preflight import shape_of, weight_bytes

    model = load_causal_lm(ModelSpec(name_or_path=str(smol_folder), dtype="bfloat16", quantization=quantization),
                           trainable=True)
    seen, held = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()
    for module in model.modules():  # 8-bit row scales and 4-bit block scales live beside the packed weights
        weight = getattr(module, "weight", None)
        extra = [getattr(weight, "SCB", None), getattr(getattr(weight, "quant_state", None), "absmax", None)]
        held += sum(x.numel() * x.element_size() for x in extra if isinstance(x, torch.Tensor))
    estimate, how = weight_bytes(shape_of({"name_or_path": str(smol_folder)}), "bfloat16", quantization,
                                 trainable=True)
    assert abs(held / estimate - 1) < 0.05, (held, estimate)
    assert "cast to fp32" in how
    frozen, _ = weight_bytes(shape_of({"name_or_path": str(smol_folder)}), "bfloat16", quantization)
    assert held / frozen > 1.3  # what the old estimate (no cast) undercounted
