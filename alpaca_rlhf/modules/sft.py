"""Supervised fine-tuning with LoRA: causal-LM loss on the response tokens."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from alpaca_rlhf.data.sft import IGNORE_INDEX, encode_prompt
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.exports import TEMPLATE_FILE, export_adapter
from alpaca_rlhf.guards import skip_nonfinite
from alpaca_rlhf.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    unwrap_peft,
)
from alpaca_rlhf.modules.adapter_stage import AdapterStage, adapter_export_folder


def plain_output_layer(model) -> bool:
    """Whether the causal LM's logits are just its output layer applied to the decoder's last hidden state."""
    cfg = model.config
    return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logits_scaling", None) in (None, 1)
            and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None)


class SFTModule(AdapterStage, L.LightningModule):
    """LoRA on a causal LM, trained on the unmasked (response) tokens.

    Args:
        model: The base model to adapt.
        lora: The LoRA adapter's settings.
        output_dir: Where the trained adapter (PEFT format), tokenizer and template are exported at the end of fit.
        template: Prompt template (bundled name or JSON path), exported beside the adapter.
        optimizer: Optimizer over the trainable (LoRA) parameters.
        scheduler: Learning-rate schedule, stepped every optimizer step; None keeps the LR constant.
        sample_instruction: Instruction whose greedy generation is logged to TensorBoard at each validation.
        sample_max_new_tokens: Length of that generation.
        adapter_dir: The old name of `output_dir`, still read (with a warning).
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        lora: LoraSpec = LoraSpec(),
        output_dir: str = "output/lora-alpaca",
        template: str = "alpaca",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        sample_instruction: str = "Give three tips for staying healthy.",
        sample_max_new_tokens: int = 48,
        adapter_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.output_dir = adapter_export_folder(output_dir, adapter_dir)
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.template = PromptTemplate.load(template)
        self.sample_instruction, self.sample_max_new_tokens = sample_instruction, sample_max_new_tokens
        self.tokenizer = load_tokenizer(model)
        self.model = apply_lora(load_causal_lm(model), lora)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.strict_loading = False  # checkpoints hold the adapter only; the base comes from `model`

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def response_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, V) in fp32, targets (N,)) at the N positions that carry a label.

        The output layer runs on the labelled positions only (as TRL's default loss does): the decoder's
        hidden states are gathered at those N positions and the output layer (with its adapter, if targeted)
        maps (N, H) to (N, V). A full (B, T, V) logits tensor is ~1 GiB in fp32 for a batch of 8 x 256 with
        Llama 3's 128k vocabulary, and with SmolLM2's 49k vocabulary the output layer is a fifth of the
        model's multiply-adds per position. A model that changes its logits after the output layer (Gemma 2's
        final soft-capping, Granite's logit scaling) goes through its own forward instead, limited to the
        columns where some row has a label (`logits_to_keep`).
        """
        targets = batch["labels"][:, 1:]  # token t is predicted at position t-1
        keep = targets != IGNORE_INDEX  # (B, T-1)
        base = unwrap_peft(self.model)
        if plain_output_layer(base):
            hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False).last_hidden_state  # (B, T, H)
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
            return logits.float(), targets[keep]
        columns = keep.any(0).nonzero().squeeze(-1)  # (K,) positions that predict some row's label
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            logits_to_keep=columns).logits  # (B, K, V)
        keep = keep[:, columns]
        return logits[keep].float(), targets[:, columns][keep]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, targets = self.response_logits(batch)
        loss = torch.nn.functional.cross_entropy(logits, targets)  # mean NLL over labelled tokens
        if skip_nonfinite(self, loss, batch_idx):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, targets = self.response_logits(batch)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        self.val_loss.update(loss, weight=targets.numel())
        self.val_perplexity.update(logits[None], targets[None])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_sample()

    @rank_zero_only
    def _log_sample(self) -> None:
        if not isinstance(self.logger, TensorBoardLogger):
            return
        template = self.template.bind(self.tokenizer)
        prompt = template.render(self.sample_instruction)
        ids = torch.tensor([encode_prompt(self.tokenizer, prompt)], device=self.device)
        ids = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.sample_max_new_tokens, do_sample=False,
                                      use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=template.stop_token_ids())
        response = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        text = f"**{self.sample_instruction}**\n\n    {response}"  # 4 spaces: TensorBoard renders markdown
        self.logger.experiment.add_text("samples/generation", text, self.global_step)

    def on_fit_end(self) -> None:
        # on_fit_end, not on_train_end: a resumed run that had already reached its last step skips the training
        # loop (and on_train_end) but still ends here, so a kill between the last checkpoint and the export heals
        if self.trainer.is_global_zero:
            export_adapter(self.model, self.tokenizer, self.output_dir,
                           {TEMPLATE_FILE: self.template.to_json()})
