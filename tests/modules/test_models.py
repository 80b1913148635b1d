import json
from pathlib import Path

import pytest
import torch

from alpaca_rlhf.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    merge_adapter,
)


def _batch(tokenizer, n=4):
    texts = ["Below is an instruction.\n\n### Response:\nThe sky is blue.", "Give three tips. Eat well."] * (n // 2)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def test_tiny_base_is_a_real_folder(tiny_base, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_base / "config.json").is_file() and (tiny_base / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tiny_base))
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer("hi")["input_ids"][0] == tiny_tokenizer.bos_token_id


def test_pad_token_is_taken_from_reserved_tokens_never_eos(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.pad_token = tok.eos_token  # the classic mistake
    n = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == n  # no new token, so no resize needed


def _train_steps(model, batch, steps=8, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_only_lora_weights_change(tiny_base, tiny_tokenizer):
    model = apply_lora(load_causal_lm(ModelSpec(name_or_path=str(tiny_base))), LoraSpec(r=4, dropout=0.0))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = _train_steps(model, _batch(tiny_tokenizer))
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if "lora_B" in name or "lora_A" in name:
            assert p.requires_grad and changed, name
        else:
            assert not p.requires_grad and not changed, name


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_lora_on_quantized_tiny_model_trains(tiny_base, tiny_tokenizer, quantization):
    spec = ModelSpec(name_or_path=str(tiny_base), quantization=quantization, gradient_checkpointing=True)
    model = apply_lora(load_causal_lm(spec), LoraSpec(r=4, dropout=0.0))
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear8bitLt" if quantization == "8bit" else "Linear4bit") in kinds
    losses = _train_steps(model, _batch(tiny_tokenizer), steps=6)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_gradient_checkpointing_gives_same_gradients(tiny_base, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = apply_lora(load_causal_lm(ModelSpec(name_or_path=str(tiny_base), gradient_checkpointing=ckpt)),
                           LoraSpec(r=4, dropout=0.0))
        with torch.no_grad():  # give lora_B a value so lora_A gets a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_disable_dropout_zeroes_every_dropout(tiny_base):
    model = apply_lora(load_causal_lm(ModelSpec(name_or_path=str(tiny_base))), LoraSpec(r=4, dropout=0.3))
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_bad_spec_values_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(dtype="float8")
    with pytest.raises(ValueError, match="quantization"):
        ModelSpec(quantization="3bit")


def test_load_tokenizer_padding_side(tiny_base):
    assert load_tokenizer(ModelSpec(name_or_path=str(tiny_base)), padding_side="left").padding_side == "left"


def test_a_missing_stage_output_is_named_not_sent_to_the_hub(tmp_path, monkeypatch):
    from alpaca_rlhf.models import looks_local

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'output/tiny/reward_model-adapter-merged' does not exist.*merge"):
        load_causal_lm(ModelSpec(name_or_path="output/tiny/reward_model-adapter-merged"))
    with pytest.raises(FileNotFoundError, match="earlier stage"):
        load_tokenizer(ModelSpec(name_or_path="./output/lora-alpaca-adapter-merged"))
    assert looks_local("./x") and looks_local("/abs/x") and looks_local("output/tiny/x")
    assert looks_local("output/lora-alpaca-adapter-merged") and looks_local("model.gguf")  # one slash, known root
    with pytest.raises(FileNotFoundError, match="earlier stage"):
        load_tokenizer(ModelSpec(name_or_path="output/lora-alpaca-adapter-merged"))
    assert not looks_local("meta-llama/Llama-3.1-8B")  # a hub id keeps transformers' own handling


def test_an_uncached_hub_id_offline_is_named_with_the_fix_through_the_cli(tmp_path, monkeypatch, capsys):
    """Offline, an uncached hub id printed huggingface_hub's innermost message ("... set 'local_files_only' to
    False"): no model name and the wrong advice."""
    from alpaca_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "HuggingFaceTB/No-Such-Model-135M", "--instruction", "hi"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "'HuggingFaceTB/No-Such-Model-135M'" in err and "offline" in err and "local folder" in err
    assert "local_files_only' to False" not in err and "Traceback" not in err


def test_a_tiny_block_never_builds_a_random_model_in_place_of_a_named_one(tmp_path, monkeypatch, capsys):
    """`fit -c tiny/sft --model.init_args.model.name_or_path HuggingFaceTB/SmolLM2-135M-Instruc` (a typo) exited 0,
    trained a random LLaMA and left ./HuggingFaceTB/SmolLM2-135M-Instruc behind."""
    from alpaca_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        main(["fit", "-c", "tiny/sft", "--model.init_args.model.name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruc",
              "--trainer.max_steps", "1"])
    assert refused.value.code == 1
    err = capsys.readouterr().err
    assert "'HuggingFaceTB/SmolLM2-135M-Instruc' is not a local folder" in err and "tiny null" in err
    assert not (tmp_path / "HuggingFaceTB").exists() and not (tmp_path / "output/tiny/lora-alpaca").exists()
    spec = ModelSpec(name_or_path=str(tmp_path / "mine"), tiny={"hidden_size": 32}, tiny_vocab_size=300)
    assert (Path(load_tokenizer(spec).name_or_path) / "config.json").is_file()  # its own local folder: built


@pytest.mark.slow
def test_another_gguf_of_the_same_name_and_size_is_converted_again(smol_gguf, tmp_path):
    """The conversion cache was keyed by file name and size: a different file of that name and size loaded the
    first one's weights. It is keyed by content now (the real SmolLM2 file, and a copy with one weight byte
    changed)."""
    import shutil

    from safetensors.torch import load_file

    from alpaca_rlhf.models import gguf_folder

    spec = ModelSpec(name_or_path="model.gguf", gguf_cache=str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(smol_gguf, path)
    folder = gguf_folder(spec, str(path))
    first = json.loads((folder / "converted_from.json").read_text())["fingerprint"]
    weights = load_file(folder / "model.safetensors")
    assert gguf_folder(spec, str(path)) == folder  # the same file: the cache is reused, nothing converted
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF  # one byte of the last tensor's data; name and size unchanged
    path.write_bytes(bytes(data))
    folder2 = gguf_folder(spec, str(path))
    assert folder2 == folder and json.loads((folder / "converted_from.json").read_text())["fingerprint"] != first
    changed = load_file(folder / "model.safetensors")
    assert any(not torch.equal(weights[k], changed[k]) for k in weights)


def test_4bit_lora_still_learns_after_an_eval_forward(tiny_base, tiny_tokenizer):
    """bitsandbytes repacks 4-bit CPU weights on an eval-mode no-grad forward (validation, generation) and its
    backward then stops at those layers; trainable models must not take that path (models.py). This base's
    k/v projections have 16 outputs, which the repacked kernel also rejects."""
    spec = ModelSpec(name_or_path=str(tiny_base), quantization="4bit")
    model = apply_lora(load_causal_lm(spec), LoraSpec(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = _batch(tiny_tokenizer)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_frozen_4bit_model_with_odd_layer_sizes_scores(tiny_base):
    """A frozen 4-bit model (the reward model in PPO) whose k/v projections have 16 outputs runs in eval mode."""
    from alpaca_rlhf.models import load_sequence_classifier

    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    scores = {}
    for quantization in (None, "4bit"):
        model = load_sequence_classifier(ModelSpec(name_or_path=str(tiny_base), quantization=quantization),
                                         pad_token_id=0, trainable=False)
        torch.manual_seed(0)
        torch.nn.init.normal_(model.score.weight, std=0.5)
        with torch.no_grad():
            scores[quantization] = model(input_ids=ids).logits.squeeze(-1)
    assert torch.isfinite(scores["4bit"]).all()
    torch.testing.assert_close(scores["4bit"], scores[None], rtol=0, atol=0.25)  # nf4 rounding only


@pytest.mark.parametrize("how", ["lora_on_lm_head", "modules_to_save"])
def test_merge_is_exact_on_a_model_with_tied_embeddings(tmp_path, tiny_tokenizer, how):
    """SmolLM2 ties input and output embeddings; an lm_head adapter merged into the shared matrix changed the
    input embeddings too (logits off by 1.74 on a tiny tied model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    lora = (LoraSpec(r=4, target_modules=["q_proj", "lm_head"]) if how == "lora_on_lm_head"
            else LoraSpec(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model = apply_lora(load_causal_lm(ModelSpec(name_or_path=str(tmp_path / "base"))), lora)
    with torch.no_grad():  # a trained adapter: every trainable tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        expected = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(merged.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
