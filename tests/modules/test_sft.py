import os
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from alpaca_rlhf.data import AlpacaDataModule
from alpaca_rlhf.models import LoraSpec, ModelSpec, merge_adapter
from alpaca_rlhf.modules import SFTModule
from cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_sft_loss_falls_clearly(tiny_base):
    L.seed_everything(0)
    module = SFTModule(model=ModelSpec(name_or_path=str(tiny_base)),
                       lora=LoraSpec(r=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                     modules_to_save=["lm_head"]),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = AlpacaDataModule("alpaca_rlhf/data/samples/alpaca_sample.json", val_set_size=0, batch_size=8,
                          cutoff_len=128)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, dm)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)  # e.g. 6.2 -> 5.3 in 40 steps


def test_checkpoint_is_adapter_sized_and_export_loads(tiny_sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = torch.load(tiny_sft_run / "output/tiny/checkpoints/sft/last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k or "lm_head" in k for k in keys), keys[:5]
    assert "optimizer_states" in ckpt and "lr_schedulers" in ckpt and "loops" in ckpt
    adapter = tiny_sft_run / "output/tiny/lora-alpaca"
    for name in ("adapter_config.json", "adapter_model.safetensors", "template.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    base = AutoModelForCausalLM.from_pretrained(tiny_sft_run / "output/tiny/base")
    model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_merged_logits_match_base_plus_adapter(tiny_sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok(["### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_sft_run / "output/tiny/base")
    with torch.no_grad():
        plain = base(**ids).logits
        adapted = PeftModel.from_pretrained(base, tiny_sft_run / "output/tiny/lora-alpaca").eval()(**ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(**ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, adapted, atol=1e-3)  # the adapter did something


def test_merge_default_and_explicit_output(tiny_sft_run, tmp_path):
    out = merge_adapter(str(tiny_sft_run / "output/tiny/lora-alpaca"), output_dir=str(tmp_path / "m"), dtype="bfloat16")
    assert (out / "model.safetensors").is_file() and (out / "template.json").is_file()
    assert next(iter(load_file(out / "model.safetensors").values())).dtype == torch.bfloat16
    assert not list(tmp_path.glob(".m.tmp-*"))  # no half-written folder left behind


KILL_CONFIG = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: output/tiny/checkpoints/sft, every_n_train_steps: 20, save_top_k: 1, save_last: true}
    - class_path: tests.helpers.KillAtStep
      init_args: {step: 21}
"""


def test_resume_gives_the_same_adapter(tmp_path, monkeypatch):
    """40 steps straight == killed after step 21, resumed from last.ckpt (step 20, mid-epoch: 45 per epoch)."""
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs/tiny/sft.yaml"), *QUIET, "--trainer.val_check_interval", "1000",
              "--trainer.limit_val_batches", "0", "--trainer.max_steps", "40"]
    cli_main(["fit", *config, "--model.init_args.adapter_dir", "straight"])
    straight = load_file("straight/adapter_model.safetensors")
    os.remove("output/tiny/checkpoints/sft/last.ckpt")
    Path("kill.yaml").write_text(KILL_CONFIG)
    with pytest.raises(RuntimeError, match="killed at step 21"):
        cli_main(["fit", *config, "--config", "kill.yaml", "--model.init_args.adapter_dir", "killed",
                  "--overwrite", "true"])  # a new run beside the straight run's step40.ckpt
    assert not Path("killed").exists()  # no export from a killed run
    assert torch.load("output/tiny/checkpoints/sft/last.ckpt", weights_only=False)["global_step"] == 20
    cli_main(["fit", *config, "--model.init_args.adapter_dir", "resumed", "--ckpt_path", "last"])
    resumed = load_file("resumed/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_response_only_loss_equals_the_full_logits_loss(tiny_base):
    """The output layer on labelled positions only gives HF's causal-LM loss and the same gradients."""
    from alpaca_rlhf.data.sft import SFTCollator, tokenize_example

    module = SFTModule(model=ModelSpec(name_or_path=str(tiny_base)),
                       lora=LoraSpec(r=4, dropout=0.0, modules_to_save=["lm_head"]))
    tok = module.tokenizer
    batch = SFTCollator(tok.pad_token_id)([tokenize_example(tok, "Say hi:\n", "Hello there.", 64),
                                           tokenize_example(tok, "Count to three please:\n", "One two three.", 64)])
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.fill_(0.02)
    full = module(**batch).loss
    full.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    ours = module.training_step(batch, 0)
    ours.backward()
    torch.testing.assert_close(ours, full)
    for n, p in module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_sft_loss_is_the_models_own_loss_with_its_logit_post_processing(tmp_path, tiny_tokenizer, family):
    """Gemma 2 soft-caps its final logits and Granite scales them: the loss must go through the model's own
    output path (a hand-applied lm_head gave 33.25 vs 23.81 on Gemma 2 and 29.96 vs 7.46 on Granite)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig

    common = dict(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny_tokenizer.pad_token_id,
                  bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    config = (Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0) if family == "gemma2"
              else GraniteConfig(**common, logits_scaling=0.25))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large logits, so capping/scaling changes the loss a lot
        model.get_output_embeddings().weight.mul_(50.0)
    model.save_pretrained(tmp_path / family)
    tiny_tokenizer.save_pretrained(tmp_path / family)
    module = SFTModule(ModelSpec(name_or_path=str(tmp_path / family)), LoraSpec(r=4, target_modules=["q_proj"]))
    module.eval()
    dm = AlpacaDataModule("alpaca_rlhf/data/samples/alpaca_sample.json", val_set_size=0, batch_size=4,
                          cutoff_len=96, max_records=4)
    dm.connect(module.tokenizer)
    dm.setup()
    batch = dm.collator()(dm.train_data)
    with torch.no_grad():
        ours = torch.nn.functional.cross_entropy(*module.response_logits(batch))
        theirs = module.model(**batch).loss
        raw = module.model.get_base_model()
        hidden = getattr(raw, raw.base_model_prefix)(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).last_hidden_state
        by_hand = torch.nn.functional.cross_entropy(raw.lm_head(hidden[:, :-1]).flatten(0, 1),
                                                    batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert abs(by_hand - theirs) > 0.5  # the post-processing matters at these logits


def test_a_run_killed_between_its_last_checkpoint_and_its_export_exports_on_resume(tmp_path, monkeypatch):
    """`--ckpt_path last` at step == max_steps skips Lightning's training loop; the export must still be written."""
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs/tiny/sft.yaml"), *QUIET, "--trainer.val_check_interval", "1000",
              "--trainer.limit_val_batches", "0", "--trainer.max_steps", "20"]
    cli_main(["fit", *config, "--model.init_args.adapter_dir", "first"])
    first = load_file("first/adapter_model.safetensors")
    assert torch.load("output/tiny/checkpoints/sft/last.ckpt", weights_only=False)["global_step"] == 20
    cli_main(["fit", *config, "--model.init_args.adapter_dir", "healed", "--ckpt_path", "last"])  # as after a kill
    healed = load_file("healed/adapter_model.safetensors")
    assert healed.keys() == first.keys() and all(torch.equal(healed[k], first[k]) for k in first)
