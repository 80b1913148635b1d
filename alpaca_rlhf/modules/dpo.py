"""Direct preference optimisation (Rafailov et al. 2023) with LoRA, on the reward-model stage's preference data.

The reference is the policy with its adapter disabled (no second copy of the model), as PPO's. With B = 0 at the
start the policy is the reference: the loss starts at log 2 and every implicit reward at 0.

Loss (TRL's `sigmoid` loss; `label_smoothing` > 0 is conservative DPO, cDPO, Mitchell 2023), per pair:
    z = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)
log pi(y|x) is the sum of the response tokens' log-probabilities (the prompt is not scored). Logged under
TRL's names: `rewards/chosen`, `rewards/rejected` (beta x the log-ratios), `rewards/accuracies` (chosen above
rejected; a tie is not a win), `rewards/margins`; validation the same under `val/`.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.exports import TEMPLATE_FILE, export_adapter
from alpaca_rlhf.guards import skip_nonfinite
from alpaca_rlhf.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
)
from alpaca_rlhf.modules.adapter_stage import AdapterStage, adapter_export_folder
from alpaca_rlhf.ppo.logprobs import response_logprobs


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair loss (B,), chosen rewards (B,), rejected rewards (B,)) from (B,) sequence log-probs."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    z = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, chosen.detach(), rejected.detach()


def sequence_logprobs(model, batch: dict) -> Tensor:
    """(2B,) sum over each row's response tokens of log p(token | everything before it)."""
    mask = batch["response_mask"][:, 1:]  # token t is predicted at position t-1
    columns = mask.any(0).nonzero().squeeze(-1)  # positions that predict some row's response token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=columns).logits  # (2B, K, V)
    targets = batch["input_ids"][:, 1:][:, columns]
    logprobs = response_logprobs(logits, targets, temperature=1.0)  # (2B, K) fp32, PPO's own function
    return (logprobs * mask[:, columns]).sum(-1)


class DPOModule(AdapterStage, L.LightningModule):
    """LoRA on a causal LM (usually the merged SFT model) trained with the DPO loss on preference pairs.

    Args:
        model: The model to adapt; with its adapter disabled it is also the reference.
        lora: The adapter (bias "none": a trained bias would move the reference too).
        output_dir: Where the trained adapter, tokenizer and template are exported at the end of fit.
        template: Prompt template; the data module's must be the same.
        beta: Strength of the implicit KL to the reference (TRL's default 0.1).
        label_smoothing: Probability that a pair's label is flipped (cDPO); 0 = plain DPO.
        optimizer: Optimizer over the adapter.
        scheduler: Learning-rate schedule, stepped every optimizer step; None keeps the LR constant.
        adapter_dir: The old name of `output_dir`, still read (with a warning).
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        lora: LoraSpec = LoraSpec(),
        output_dir: str = "output/dpo",
        template: str = "alpaca",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lora.bias != "none":
            raise ConfigError(f"lora.bias={lora.bias!r}: DPO's reference is the model with its adapter disabled, "
                              "which trained biases would move too; use bias: none")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.output_dir = adapter_export_folder(output_dir, adapter_dir)
        self.beta, self.label_smoothing = beta, label_smoothing
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.template = PromptTemplate.load(template)
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.model = apply_lora(load_causal_lm(model), lora)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        disable_dropout(self.model)  # policy and reference passes must differ only by the adapter
        self.strict_loading = False  # checkpoints hold the adapter only; the base comes from `model`

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "response_mask"):  # a PreferenceDataModule: its batches must mark the responses
            datamodule.response_mask = True

    def pair_logprobs(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(policy, reference) sequence log-probs, each (2B,): rows [0, B) chosen, [B, 2B) rejected."""
        if "response_mask" not in batch:
            raise ConfigError("DPO batches need response masks: PreferenceDataModule(response_mask=True)")
        policy = sequence_logprobs(self.model, batch)
        with torch.no_grad(), self.model.disable_adapter():
            reference = sequence_logprobs(self.model, batch)
        return policy, reference

    def _step(self, batch: dict, prefix: str) -> Tensor:
        policy, reference = self.pair_logprobs(batch)
        (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
        loss = losses.mean()
        n = pc.shape[0]
        self.log_dict({**({"val/loss": loss} if prefix else {}), f"{prefix}rewards/chosen": chosen.mean(),
                       f"{prefix}rewards/rejected": rejected.mean(),
                       f"{prefix}rewards/accuracies": (chosen > rejected).float().mean(),
                       f"{prefix}rewards/margins": (chosen - rejected).mean()},
                      prog_bar=prefix == "val/", batch_size=n, sync_dist=prefix == "val/")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        loss = self._step(batch, "")
        if skip_nonfinite(self, loss, batch_idx):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0] // 2)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val/")

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:  # on_fit_end: a resumed run past its last step still exports
            export_adapter(self.model, self.tokenizer, self.output_dir, {TEMPLATE_FILE: self.template.to_json()})
