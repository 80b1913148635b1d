"""Prompts for PPO: Alpaca instructions (or the seed's `user_input`) rendered with the SFT template."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info

from alpaca_rlhf.data.base import TokenizedDataModule
from alpaca_rlhf.data.records import read_raw_records, string_field, validate_records
from alpaca_rlhf.data.sft import encode_prompt, seeded_split
from alpaca_rlhf.data.templates import PromptTemplate


def check_prompt(record: dict):
    """An Alpaca record (`instruction`, optional `input`) or a seed preference record (`user_input`)."""
    if "instruction" not in record and "user_input" in record:
        return string_field(record, "user_input", non_empty=True)
    return string_field(record, "instruction", non_empty=True) or string_field(record, "input", required=False)


def render_prompt(record: dict, template: PromptTemplate) -> str:
    if "instruction" in record:
        return template.render(record["instruction"], record.get("input") or "")
    return template.render(record["user_input"])


@dataclass
class PromptCollator:
    """Left-pads prompt ids for generation: `input_ids`, `attention_mask`, plus the rendered `prompt` texts."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, width - n :] = torch.tensor(e["input_ids"])
            attention_mask[i, width - n :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt": [e["prompt"] for e in examples]}


class PromptDataModule(TokenizedDataModule):
    """Prompt batches for PPO; one batch is one PPO iteration (drop-last, so every iteration has `batch_size`).

    Args:
        data_path: Hub dataset name or local `.json`/`.jsonl` of Alpaca records or `{user_input, ...}` records.
        template: Bundled template name or a template JSON path (the SFT stage's).
        max_prompt_length: Prompts with more tokens are dropped (and counted): cutting one would cut the template.
        val_set_size: Held-out prompts (count or fraction) on which validation measures the mean score.
        batch_size: Prompts per PPO iteration on each process (episodes = batch_size x processes).
        num_workers: DataLoader workers.
        seed: Seed of the hold-out split and of the shuffling.
        skip_bad_records: Drop malformed records (counted and logged) instead of stopping with an error.
        max_records: Use only the first N valid records.
    """

    def __init__(
        self,
        data_path: str = "yahma/alpaca-cleaned",
        template: str = "alpaca",
        max_prompt_length: int = 256,
        val_set_size: int | float = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 42,
        skip_bad_records: bool = False,
        max_records: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.data_path, self.max_prompt_length, self.val_set_size = data_path, max_prompt_length, val_set_size
        self.skip_bad_records, self.max_records = skip_bad_records, max_records
        self.template = PromptTemplate.load(template)
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None
        self.report = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        tokenizer = self._require_tokenizer()
        records, self.report = validate_records(read_raw_records(self.data_path), self.data_path, check_prompt,
                                                self.skip_bad_records)
        records = records[: self.max_records] if self.max_records else records
        examples = []
        for record in records:
            prompt = render_prompt(record, self.template)
            ids = encode_prompt(tokenizer, prompt)
            if len(ids) > self.max_prompt_length:
                self.report.dropped_too_long += 1
                continue
            examples.append({"input_ids": ids, "prompt": prompt})
        train_idx, val_idx = (seeded_split(len(examples), self.val_set_size, self.seed) if self.val_set_size
                              else (list(range(len(examples))), []))
        self.train_data = [examples[i] for i in train_idx]
        self.val_data = [examples[i] for i in val_idx]
        if len(self.train_data) < self.batch_size:
            raise ValueError(f"{self.data_path}: {len(self.train_data)} usable prompts, fewer than one batch "
                             f"of {self.batch_size} ({self.report.summary()})")
        rank_zero_info(f"{self.report.summary()}; {len(self.train_data)} train / {len(self.val_data)} val prompts")

    def collator(self) -> PromptCollator:
        return PromptCollator(self._require_tokenizer().pad_token_id)

    def train_dataloader(self):
        return self._train_loader(self.train_data, self.collator(), drop_last=True)

    def val_dataloader(self):
        return self._eval_loader(self.val_data, self.collator()) if self.val_data else []
