"""Reward model: a one-score head on the SFT model, trained with LoRA on preference pairs.

The export (`output_dir`, and the folder `python cli.py merge` makes from it) carries `reward_stats.json`,
`{"mean", "std", "n", "split"}`: the score statistics over the held-out chosen and rejected responses, taken
with the final weights. PPO loads the merged folder with `alpaca_rlhf.models.load_reward_model`, which returns
these stats, scores with `score` below and subtracts `mean` (optionally dividing by `std`) to centre rewards.
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import BinaryAccuracy

from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.evaluation import accuracy_report, format_accuracy_report
from alpaca_rlhf.exports import TEMPLATE_FILE, export_adapter
from alpaca_rlhf.guards import skip_nonfinite
from alpaca_rlhf.models import (
    REWARD_STATS_FILE,
    LoraSpec,
    ModelSpec,
    apply_lora,
    load_sequence_classifier,
    load_tokenizer,
    unwrap_peft,
)
from alpaca_rlhf.modules.adapter_stage import AdapterStage, adapter_export_folder

# read-only defaults (a dataclass instance per signature, as LightningCLI shows them in --print_config)
DEFAULT_BASE = ModelSpec(name_or_path="output/lora-alpaca-adapter-merged")
DEFAULT_LORA = LoraSpec()


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B,) index of each row's last real token: right, left or both-sides padding alike."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.flip(-1).argmax(-1)  # argmax finds the first 1 counted from the right


def score(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) reward-model scores, read at each sequence's last real token.

    Works on a PEFT-wrapped or a plain (merged) `*ForSequenceClassification`. Positions count real tokens
    only, so a left-padded sequence scores as its right-padded twin; on right-padded input the result equals
    the plain model's `logits` (HF pools the rightmost non-pad token).

    Args:
        model: Sequence classifier with `num_labels=1`.
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 on real tokens, 0 on padding (either side, or both).
    """
    classifier = unwrap_peft(model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) 0 at the first real token
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
    head = classifier.score
    with torch.autocast(hidden.device.type, enabled=False):  # an fp32 head gives fp32 scores under bf16-mixed
        return head(last.to(head.weight.dtype)).squeeze(-1).float()


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: float = 0.0) -> Tensor:
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin), mean over pairs (Ouyang et al., 2022;
    the margin as in Llama 2, Touvron et al., 2023)."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()


class RewardModule(AdapterStage, L.LightningModule):
    """LoRA and a `score` head (num_labels=1) on a base LM, trained on stacked chosen/rejected pairs.

    Args:
        model: The base (the merged SFT model); its `score` head starts random and trains with the adapter.
        lora: The LoRA adapter's settings; `score` is added to its `modules_to_save`.
        output_dir: Where the adapter (with the head), tokenizer, template and `reward_stats.json` are
            exported at the end of fit.
        template: Prompt template (bundled name or JSON path), exported beside the adapter.
        margin: Required score gap: the loss is -log sigmoid(r_chosen - r_rejected - margin).
        optimizer: Optimizer over the trainable (LoRA and head) parameters.
        scheduler: Learning-rate schedule, stepped every optimizer step; None keeps the LR constant.
        adapter_dir: The old name of `output_dir`, still read (with a warning).
    """

    def __init__(
        self,
        model: ModelSpec = DEFAULT_BASE,
        lora: LoraSpec = DEFAULT_LORA,
        output_dir: str = "output/reward_model",
        template: str = "alpaca",
        margin: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.output_dir, self.margin = adapter_export_folder(output_dir, adapter_dir), margin
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.template = PromptTemplate.load(template)
        self.tokenizer = load_tokenizer(model, padding_side="right")
        base = load_sequence_classifier(model, pad_token_id=self.tokenizer.pad_token_id)
        self.model = apply_lora(base, lora, task_type="SEQ_CLS")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.val_loss, self.val_margin = MeanMetric(), MeanMetric()
        self.val_accuracy = BinaryAccuracy()
        self.val_scores = CatMetric()  # every held-out score, for mean/std and the exported centring stats
        self.val_chosen, self.val_rejected = CatMetric(), CatMetric()  # for TensorBoard's histograms
        self.val_outcomes = CatMetric()  # per held-out pair, in order: 1 right, 0.5 tie, 0 wrong (the report)
        self.stats: dict | None = None  # of the latest full validation: {"mean", "std", "n", "split", "step"}
        self.strict_loading = False  # checkpoints hold the adapter and head only; the base comes from `model`

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return score(self.model, input_ids, attention_mask)

    def _pair_scores(self, batch: dict) -> tuple[Tensor, Tensor]:
        # one forward over the stacked (2B, T) batch: rows [0, B) chosen, [B, 2B) rejected
        return self(batch["input_ids"], batch["attention_mask"]).chunk(2)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        chosen, rejected = self._pair_scores(batch)
        loss = pairwise_loss(chosen, rejected, self.margin)
        if skip_nonfinite(self, loss, batch_idx):
            return None
        self.log_dict({"train/loss": loss, "train/accuracy": (chosen > rejected).float().mean()},
                      prog_bar=True, batch_size=chosen.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        chosen, rejected = self._pair_scores(batch)
        self.update_val_metrics(chosen, rejected)
        self.log_dict({"val/loss": self.val_loss, "val/accuracy": self.val_accuracy,
                       "val/margin": self.val_margin}, prog_bar=True, batch_size=chosen.shape[0])

    def update_val_metrics(self, chosen: Tensor, rejected: Tensor) -> None:
        """Accumulates one batch's (B,) chosen and rejected scores into the validation metrics."""
        self.val_loss.update(pairwise_loss(chosen, rejected, self.margin), weight=chosen.shape[0])
        self.val_margin.update(chosen - rejected)
        wins = (chosen > rejected).long()  # a tie is not a win
        self.val_accuracy.update(wins, torch.ones_like(wins))
        self.val_scores.update(torch.cat([chosen, rejected]))
        self.val_chosen.update(chosen)
        self.val_rejected.update(rejected)
        self.val_outcomes.update(((chosen - rejected).sign() + 1) / 2)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scores.compute() if self.val_scores.update_count else torch.zeros(0)
        self.val_scores.reset()
        for tag, metric in (("val/scores_chosen", self.val_chosen), ("val/scores_rejected", self.val_rejected)):
            values = metric.compute() if metric.update_count else None
            metric.reset()
            if (values is not None and isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero
                    and not self.trainer.sanity_checking):
                self.logger.experiment.add_histogram(tag, values.float().cpu(), self.global_step)
        outcomes = self.val_outcomes.compute() if self.val_outcomes.update_count else None
        self.val_outcomes.reset()
        report = None if self.trainer.sanity_checking or outcomes is None else self.held_out_report(outcomes)
        if scores.numel():
            mean, std = scores.mean(), scores.std(unbiased=False)
            self.log_dict({"val/score_mean": mean, "val/score_std": std})
            if not self.trainer.sanity_checking:
                self.stats = {"mean": mean.item(), "std": std.item(), "n": scores.numel(), "split": "val",
                              "step": self.global_step, **({"accuracy_report": report} if report else {})}

    def held_out_report(self, outcomes: Tensor) -> dict | None:
        """Held-out accuracy with its 95% interval beside "prefer the shorter / longer / refusal", overall and
        per subset (`alpaca_rlhf.evaluation`); logged, and flagged when the model is not clearly above the best
        rule. Needs the validation pairs' texts in order (one process, `PreferenceDataModule`)."""
        pairs = getattr(self.trainer.datamodule, "val_data", None) if self.trainer.datamodule else None
        if not pairs or len(pairs) != outcomes.numel() or "chosen" not in pairs[0] or self.trainer.world_size > 1:
            return None
        report = accuracy_report(outcomes.tolist(), [p["chosen"] for p in pairs], [p["rejected"] for p in pairs],
                                 [p.get("subset") for p in pairs])
        overall = report["all"]
        self.log_dict({"val/accuracy_ci_low": overall["ci95"][0], "val/accuracy_ci_high": overall["ci95"][1],
                       "val/accuracy_over_best_rule": overall["margin_over_best_rule"]})
        # per subset, so a learning curve (bench/rm_curve.py) or TensorBoard shows which subset moves
        self.log_dict({f"val_subset/{name}/{key}": value for name, r in report.items() if name != "all"
                       for key, value in (("accuracy", r["accuracy"]),
                                          ("over_best_rule", r["margin_over_best_rule"]))})
        lines = format_accuracy_report(report, "held-out accuracy")
        rank_zero_info("reward model on the held-out pairs:\n" + "\n".join(lines))
        weak = [name for name, r in report.items() if not r["beats_rules"]]
        if weak:
            rank_zero_warn(f"the reward model is not clearly above a length or refusal rule on {', '.join(weak)}: "
                           "it may reward length or refusals rather than quality (see the held-out report above)")
        return report

    @torch.no_grad()
    def score_stats(self, loader) -> dict:
        """Mean and std of the scores of every chosen and rejected response in `loader`."""
        was_training = self.model.training
        self.model.eval()
        # outside a step Lightning applies no precision context (bf16 autocast): apply it here
        context = self.trainer.precision_plugin.forward_context() if self._trainer else nullcontext()
        with context:
            scores = torch.cat([self(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
                                for b in loader])
        self.model.train(was_training)
        return {"mean": scores.mean().item(), "std": scores.std(unbiased=False).item(), "n": scores.numel()}

    def final_stats(self) -> dict | None:
        """Score statistics of the final weights over the held-out pairs (the training pairs if none)."""
        if self.stats and self.stats["step"] == self.global_step:  # the last validation saw the final weights
            return {k: v for k, v in self.stats.items() if k != "step"}
        datamodule = self.trainer.datamodule
        for split in ("val", "train"):
            pairs = getattr(datamodule, f"{split}_data", None)
            if pairs:
                loader = DataLoader(pairs, batch_size=datamodule.batch_size, collate_fn=datamodule.collator())
                return {**self.score_stats(loader), "split": split}
        rank_zero_warn(f"no preference pairs to compute {REWARD_STATS_FILE} from: PPO will not centre scores")
        return None

    def on_fit_end(self) -> None:
        # on_fit_end, not on_train_end: a resumed run that had already reached its last step skips the training
        # loop (and on_train_end) but still ends here, so a kill between the last checkpoint and the export heals
        if not self.trainer.is_global_zero:
            return
        stats = self.final_stats()
        extra = {TEMPLATE_FILE: self.template.to_json(), **({REWARD_STATS_FILE: stats} if stats else {})}
        export_adapter(self.model, self.tokenizer, self.output_dir, extra)
