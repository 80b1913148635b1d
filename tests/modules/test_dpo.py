"""DPO: the loss by hand, the response-only log-probs, the adapter-disabled reference, and learning on the tiny
preference pairs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from alpaca_rlhf.data import PreferenceDataModule
from alpaca_rlhf.models import LoraSpec, ModelSpec
from alpaca_rlhf.modules.dpo import DPOModule, dpo_loss, sequence_logprobs

PAIRS = "alpaca_rlhf/data/samples/preferences_sample.jsonl"


def test_dpo_loss_by_hand_with_and_without_label_smoothing():
    """Rafailov et al. 2023, eq. 7; cDPO (Mitchell 2023) as TRL's `sigmoid` loss with label_smoothing."""
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5])
    beta = 0.5
    z = beta * ((-10.0 + 11.0) - (-12.0 + 11.5))  # 0.5 * (1 + 0.5) = 0.75
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))))
    assert (chosen.item(), rejected.item()) == (pytest.approx(0.5), pytest.approx(-0.25))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.2)
    by_hand = -0.8 * math.log(1 / (1 + math.exp(-z))) - 0.2 * math.log(1 / (1 + math.exp(z)))
    assert smoothed.item() == pytest.approx(by_hand)


@pytest.fixture(scope="module")
def merged_sft(tiny_sft_run):
    return str(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged")


def data(module, batch_size=8, val=16):
    dm = PreferenceDataModule(PAIRS, format="seed", max_length=256, val_set_size=val, batch_size=batch_size, seed=3,
                              response_mask=True)
    dm.connect(module.tokenizer)
    dm.setup()
    return dm


def test_response_logprobs_skip_the_prompt_and_padding(merged_sft):
    module = DPOModule(ModelSpec(name_or_path=merged_sft), LoraSpec(r=4, dropout=0.0))
    dm = data(module)
    batch = dm.collator()(dm.train_data[:3])
    got = sequence_logprobs(module.model, batch)
    for row in range(6):  # one row at a time, unpadded, summed over the response by hand
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row : row + 1, :n]
        with torch.no_grad():
            logp = torch.log_softmax(module.model(input_ids=ids).logits[0, :-1].float(), -1)
        picked = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        response = batch["response_mask"][row, 1:n]
        assert response.any() and not response[0]  # the prompt is never scored
        torch.testing.assert_close(got[row], (picked * response).sum(), rtol=1e-4, atol=1e-4)


def test_the_untrained_policy_is_its_reference_and_training_raises_the_held_out_margin(merged_sft, tmp_path):
    # the adapter's random A and the batches come from this seed, not from whichever tests ran before in the
    # process (under xdist one state gave 0.69 / 0.04; seeds 0-4 give 0.75-0.88 accuracy, 0.06 margin)
    L.seed_everything(0, verbose=False)
    module = DPOModule(ModelSpec(name_or_path=merged_sft), LoraSpec(r=8, alpha=16, dropout=0.0),
                       adapter_dir=str(tmp_path / "dpo"), beta=0.1,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = data(module)
    batch = dm.collator()(dm.val_data[:8])
    policy, reference = module.pair_logprobs(batch)
    torch.testing.assert_close(policy, reference)  # B = 0: the adapter is the identity
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    assert dpo_loss(pc, pr, rc, rr)[0].mean().item() == pytest.approx(math.log(2), abs=1e-5)

    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=30, check_val_every_n_epoch=None)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert metrics["val/rewards/accuracies"] > 0.7, metrics  # held-out pairs: real answers over corrupted ones
    assert metrics["val/rewards/margins"] > 0.05 and metrics["val/loss"] < math.log(2)
    assert (tmp_path / "dpo/adapter_model.safetensors").is_file()
    with pytest.raises(Exception, match="bias"):
        DPOModule(ModelSpec(name_or_path=merged_sft), LoraSpec(r=4, bias="all"))


def test_an_export_folder_holding_the_logs_is_refused_before_training(merged_sft, tmp_path):
    """configs/smol/judge.yaml once logged to output/smol/judge/run and exported to output/smol/judge: the export
    replaced the folder and deleted the TensorBoard run."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from alpaca_rlhf.errors import ConfigError

    module = DPOModule(ModelSpec(name_or_path=merged_sft), LoraSpec(r=4, dropout=0.0),
                       adapter_dir=str(tmp_path / "out/dpo"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        logger=TensorBoardLogger(save_dir=str(tmp_path / "out"), name="dpo", version="run"))
    with pytest.raises(ConfigError, match="holds the run's log folder"):
        trainer.fit(module, data(module))
    assert not (tmp_path / "out/dpo/adapter_model.safetensors").exists()
