"""RewardModule on a tiny random LLaMA: score reading, stacking, training, export, merge, 8/4-bit, resume."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from alpaca_rlhf.data.preference import PreferenceDataModule
from alpaca_rlhf.models import LoraSpec, ModelSpec, build_tiny_base, load_reward_model, merge_adapter
from alpaca_rlhf.modules.reward import RewardModule, last_token_index, pairwise_loss, score

SAMPLE = "alpaca_rlhf/data/samples/preferences_sample.jsonl"
LORA = LoraSpec(r=8, alpha=16, dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("rm") / "base")  # the tiny configs' model (MLP 176 wide)


def make_module(base_dir: Path, adapter_dir: Path, **kwargs) -> RewardModule:
    L.seed_everything(0)
    return RewardModule(model=ModelSpec(name_or_path=str(base_dir)), lora=LORA, adapter_dir=str(adapter_dir),
                        optimizer=partial(torch.optim.AdamW, lr=3e-3), **kwargs)


def make_data(module: RewardModule, batch_size: int = 8) -> PreferenceDataModule:
    dm = PreferenceDataModule(data_path=SAMPLE, format="seed", max_length=192, val_set_size=24,
                              batch_size=batch_size, seed=1)
    dm.connect(module.tokenizer)
    return dm


def make_trainer(max_steps: int, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(**{**options, **kwargs})


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A reward model after 30 steps, validated at the last one, with its export."""
    tmp = tmp_path_factory.mktemp("trained")
    module = make_module(base_dir, tmp / "adapter")
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    dm = make_data(module)
    trainer = make_trainer(30, val_check_interval=30, check_val_every_n_epoch=None)
    trainer.fit(module, dm)
    module.eval()
    return module, dm, before, trainer


def pad(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


def test_last_token_index_under_right_left_and_both_side_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 2, 4]


def test_pairwise_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log(torch.tensor(2.0))) / 2
    assert torch.allclose(pairwise_loss(chosen, rejected), expected)
    # a margin of 2 asks for a gap of 2: the first pair is then exactly at the tie point
    assert torch.allclose(pairwise_loss(chosen, rejected, margin=2.0),
                          (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(2.0)))) / 2)


def test_score_is_the_same_under_left_and_right_padding_and_when_pad_is_eos(trained):
    module, dm, *_ = trained
    tok = module.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    sequences = [e["chosen_input_ids"] for e in dm.val_data[:4]] + [dm.val_data[0]["rejected_input_ids"]]
    with torch.no_grad():
        alone = torch.stack([module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in sequences])
        right = module(*pad(sequences, tok.pad_token_id, "right"))
        left = module(*pad(sequences, tok.pad_token_id, "left"))
        # the mask, not the pad id, finds the end: padding with EOS changes nothing
        eos_padded = module(*pad(sequences, tok.eos_token_id, "right"))
    assert alone.std() > 0.1  # the scores tell the sequences apart, so equality below means something
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eos_padded, alone, atol=1e-5, rtol=1e-5)


def test_one_stacked_forward_equals_two_forwards(trained):
    module, dm, *_ = trained
    batch = dm.collator()(dm.val_data[:6])
    with torch.no_grad():
        chosen, rejected = module._pair_scores(batch)
        pad_id = module.tokenizer.pad_token_id
        chosen_alone = module(*pad([e["chosen_input_ids"] for e in dm.val_data[:6]], pad_id))
        rejected_alone = module(*pad([e["rejected_input_ids"] for e in dm.val_data[:6]], pad_id))
    torch.testing.assert_close(chosen, chosen_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, rejected_alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(chosen, rejected)


def test_training_moves_adapter_and_head_only(trained):
    module, _, before, _ = trained
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trainable) and any("lora_B" in name for name in trainable)
    for name, p in module.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name


def test_validation_logs_and_export_carries_head_and_centring_stats(trained):
    module, dm, _, trainer = trained
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/accuracy", "val/margin", "val/score_mean", "val/score_std"):
        assert key in metrics, key
    adapter = Path(module.adapter_dir)
    assert any("score" in key for key in load_file(adapter / "adapter_model.safetensors"))
    stats = json.loads((adapter / "reward_stats.json").read_text())
    assert stats["split"] == "val" and stats["n"] == 2 * len(dm.val_data)
    fresh = module.score_stats(dm.val_dataloader())  # the stats are those of the final weights
    assert stats["mean"] == pytest.approx(fresh["mean"], abs=1e-5)
    assert stats["std"] == pytest.approx(fresh["std"], abs=1e-5)
    assert stats["mean"] == pytest.approx(metrics["val/score_mean"].item(), abs=1e-5)
    assert json.loads((adapter / "template.json").read_text())["response_split"] == "### Response:"
    # the held-out report: accuracy with its interval beside the length and refusal rules on the same pairs
    report = stats["accuracy_report"]["all"]
    assert report["n"] == len(dm.val_data) and set(report["rules"]) == {"shorter", "longer", "refusal"}
    assert report["accuracy"] == pytest.approx(metrics["val/accuracy"].item(), abs=1e-6)
    assert report["ci95"][0] <= report["accuracy"] <= report["ci95"][1]
    assert metrics["val/accuracy_over_best_rule"].item() == pytest.approx(report["margin_over_best_rule"], abs=1e-6)


def test_accuracy_counts_a_tie_as_a_loss(base_dir, tmp_path):
    module = make_module(base_dir, tmp_path / "adapter")
    module.update_val_metrics(torch.tensor([1.0, 0.5, 0.3]), torch.tensor([0.0, 0.5, 0.9]))  # win, tie, loss
    assert module.val_accuracy.compute().item() == pytest.approx(1 / 3)
    assert module.val_margin.compute().item() == pytest.approx((1.0 + 0.0 - 0.6) / 3)


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Path:
    module = trained[0]
    return merge_adapter(module.adapter_dir, str(tmp_path_factory.mktemp("merged") / "rm-merged"))


def test_merged_checkpoint_loads_plainly_and_scores_like_the_adapter(trained, merged):
    module, dm, *_ = trained
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == module.tokenizer.pad_token_id
    batch = dm.collator()(dm.val_data)  # right-padded, chosen then rejected
    with torch.no_grad():
        adapter_scores = module(**batch)
        plain_scores = plain(**batch).logits.squeeze(-1)
    torch.testing.assert_close(plain_scores, adapter_scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(score(plain, **batch), adapter_scores, atol=1e-5, rtol=1e-4)
    exported = Path(module.adapter_dir, "reward_stats.json").read_text()
    assert (merged / "reward_stats.json").read_text() == exported


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_reward_model_is_frozen_and_scores_close(trained, merged, quantization):
    import bitsandbytes as bnb

    dm = trained[1]
    full, tokenizer, stats = load_reward_model(ModelSpec(name_or_path=str(merged)))
    quant, _, _ = load_reward_model(ModelSpec(name_or_path=str(merged), quantization=quantization))
    layer = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer) for m in quant.modules())
    assert not quant.training and not any(p.requires_grad for p in quant.parameters())
    assert stats["split"] == "val"
    batch = dm.collator()(dm.val_data)
    with torch.no_grad():
        reference, scores = score(full, **batch), score(quant, **batch)
    spread = reference.std()
    assert (scores - reference).abs().max() < 0.25 * spread, (scores - reference).abs().max() / spread
    assert torch.corrcoef(torch.stack([scores, reference]))[0, 1] > 0.98


def test_resume_continues_where_the_killed_run_stopped(base_dir, tmp_path):
    def run(max_steps: int, name: str, ckpt_path: str | None = None, callbacks=()):
        module = make_module(base_dir, tmp_path / name)
        trainer = make_trainer(max_steps, limit_val_batches=0, callbacks=list(callbacks),
                               enable_checkpointing=bool(callbacks))
        # weights_only=False: our own checkpoint, whose hyperparameters hold ModelSpec and a partial
        trainer.fit(module, make_data(module, batch_size=4), ckpt_path=ckpt_path, weights_only=False)
        return module, trainer

    straight, _ = run(8, "straight")
    stats = json.loads((tmp_path / "straight" / "reward_stats.json").read_text())
    assert stats["split"] == "val" and stats["n"] == 2 * 24  # no validation ran: scored after training
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    first, _ = run(4, "first", callbacks=[checkpoint])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    trainable = {name for name, p in first.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable  # adapter-sized: no frozen base weights
    resumed, trainer = run(8, "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, dict(straight.named_parameters())[name], atol=1e-6, rtol=1e-5)


def test_shipped_8b_config_runs_on_a_tiny_base_in_8bit(base_dir, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    from cli import cli_main

    monkeypatch.chdir(tmp_path)  # the config's relative output/ paths land here
    root = Path(__file__).resolve().parents[2]
    overrides = {"model.init_args.model.name_or_path": str(base_dir), "data.init_args.data_path": SAMPLE,
                 "data.init_args.max_records": "40", "data.init_args.val_set_size": "8",
                 "data.init_args.num_workers": "0", "trainer.accelerator": "cpu", "trainer.max_steps": "2",
                 "trainer.limit_val_batches": "0",  # the stats then come from a pass after training, in bf16
                 "trainer.enable_progress_bar": "false"}
    cli = cli_main(["fit", "--config", str(root / "configs/rm.yaml")]
                   + [arg for key, value in overrides.items() for arg in (f"--{key}", value)])
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "bf16-mixed"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in cli.model.model.modules())
    export = tmp_path / "output/reward_model_Llama-3.1-8B_100_2e-05"
    stats = json.loads((export / "reward_stats.json").read_text())
    assert stats["n"] == 16 and stats["std"] > 0
