"""Alpaca instruction data for supervised fine-tuning."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info

from alpaca_rlhf.data.base import TokenizedDataModule
from alpaca_rlhf.data.records import (
    DataValidationError,
    LoadReport,
    check_alpaca,
    read_raw_records,
    split_conversation,
    validate_records,
)
from alpaca_rlhf.data.templates import PromptTemplate

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def adds_special_tokens(tokenizer, text: str) -> bool:
    """False when the text already starts with the tokenizer's BOS (a chat template writes its own)."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids, with the tokenizer's BOS if it adds one (once: not when a chat template wrote it). Every
    stage encodes prompts this way."""
    return tokenizer(prompt, add_special_tokens=adds_special_tokens(tokenizer, prompt))["input_ids"]


def encode_response(tokenizer, response: str, add_eos_token: bool = True,
                    end_ids: list[int] | None = None) -> list[int]:
    """Response ids without BOS, closed by `end_ids` (the template's end of turn, `PromptTemplate.end_of_turn_ids`)
    or by EOS when none is given (a trained BPE adds none by itself)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + list(end_ids or [tokenizer.eos_token_id]) if add_eos_token else ids


def tokenize_example(
    tokenizer,
    prompt: str,
    response: str,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    end_ids: list[int] | None = None,
) -> dict:
    """Prompt and response ids, labels -100 on the prompt unless `train_on_inputs`; cut to `cutoff_len`.

    Prompt and response are tokenized apart and concatenated, so the label boundary is exact and the prompt's
    ids are those PPO will generate from. The response ends with `end_ids` (default EOS).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = encode_response(tokenizer, response, add_eos_token, end_ids)
    input_ids = prompt_ids + response_ids
    labels = (input_ids.copy() if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + response_ids)
    truncated = len(input_ids) > cutoff_len
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


@dataclass
class SFTCollator:
    """Right-pads a batch: `input_ids` with pad, `labels` with -100, `attention_mask` 1 on real tokens."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def seeded_split(n: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): a seeded random hold-out, never the file's first rows."""
    n_val = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if n_val >= n:
        raise DataValidationError(f"val_set_size {val_size} leaves no training records out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def seeded_sample(items: list, size: int | float | None, seed: int) -> list:
    """At most `size` of `items` (a count, or a fraction below 1), drawn with `seed`, in their order: the same
    draw as `seeded_split`'s hold-out."""
    if not size:
        return items
    n = int(round(size * len(items))) if isinstance(size, float) and size < 1 else int(size)
    if n >= len(items):
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [items[i] for i in sorted(keep)]


class AlpacaDataModule(TokenizedDataModule):
    """Alpaca records `{instruction, input, output}` (or conversations `{messages: [...]}`, the last assistant
    turn being the response) rendered with the prompt template for SFT.

    Args:
        data_path: Hub dataset name (e.g. `yahma/alpaca-cleaned`), a local `.json`/`.jsonl`(`.gz`)/`.parquet`/
            `.csv`/`.arrow` file, or a folder of them.
        template: Bundled template name (`alpaca`; `chat` = the tokenizer's chat template) or a JSON path; None
            = the stage model's `template` (the command line passes it on; alone, `alpaca`).
        cutoff_len: Maximum tokens per example; longer ones are truncated and counted.
        train_on_inputs: Put loss on the prompt too (default: on the response only).
        add_eos_token: End every response so the model learns to stop: with the chat template's end-of-turn
            token (`<|eot_id|>`, `<|im_end|>`) under `template: chat`, else with EOS.
        val_set_size: Held-out records (count, or a fraction below 1), chosen with `seed`.
        batch_size: Examples per micro-batch.
        num_workers: DataLoader workers.
        seed: Seed of the hold-out split and of the shuffling.
        skip_bad_records: Drop malformed records (counted and logged) instead of stopping with an error.
        max_records: Use only the first N valid records (quick runs).
        split: The split of a hub dataset.
        hub_config: A hub dataset's configuration name (its `name` in `datasets.load_dataset`).
        revision: A hub dataset's revision (branch, tag or commit).
        fields: Our field names -> the columns holding them, e.g. `{instruction: question, output: answer}`.
    """

    def __init__(
        self,
        data_path: str = "yahma/alpaca-cleaned",
        template: str | None = None,
        cutoff_len: int = 256,
        train_on_inputs: bool = False,
        add_eos_token: bool = True,
        val_set_size: int | float = 2000,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        skip_bad_records: bool = False,
        max_records: int | None = None,
        split: str = "train",
        hub_config: str | None = None,
        revision: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.read_options = dict(split=split, hub_config=hub_config, revision=revision, fields=fields)
        self.data_path, self.cutoff_len = data_path, cutoff_len
        self.train_on_inputs, self.add_eos_token = train_on_inputs, add_eos_token
        self.val_set_size, self.skip_bad_records, self.max_records = val_set_size, skip_bad_records, max_records
        self.template = PromptTemplate.load(template or "alpaca")
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None
        self.report: LoadReport | None = None

    def load_records(self) -> list[dict]:
        """Validated records; raises `DataValidationError` on the first bad one unless skipping."""
        records, self.report = validate_records(
            read_raw_records(self.data_path, **self.read_options), self.data_path, check_alpaca, self.skip_bad_records
        )
        return records[: self.max_records] if self.max_records else records

    def prompt_of(self, record: dict) -> str:
        if "messages" in record and "instruction" not in record:
            return self.template.bind(self._require_tokenizer()).render_messages(split_conversation(
                record["messages"])[0])
        return self.template.bind(self._require_tokenizer()).render(record["instruction"], record.get("input") or "")

    @staticmethod
    def response_of(record: dict) -> str:
        if "messages" in record and "instruction" not in record:
            return split_conversation(record["messages"])[1]
        return record["output"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        tokenizer = self._require_tokenizer()
        records = self.load_records()
        end_ids = self.template.end_of_turn_ids(tokenizer)  # a chat template's end of turn, else EOS
        examples = []
        for record in records:
            ex = tokenize_example(tokenizer, self.prompt_of(record), self.response_of(record), self.cutoff_len,
                                  self.train_on_inputs, self.add_eos_token, end_ids)
            self.report.truncated += ex["truncated"]
            if all(label == IGNORE_INDEX for label in ex["labels"]):
                # the prompt alone fills cutoff_len: nothing left to learn from
                self.report.dropped_too_long += 1
                continue
            examples.append(ex)
        train_idx, val_idx = seeded_split(len(examples), self.val_set_size, self.seed) if self.val_set_size else (
            list(range(len(examples))), [])
        self.train_data = [examples[i] for i in train_idx]
        self.val_data = [examples[i] for i in val_idx]
        rank_zero_info(f"{self.report.summary()}; {len(self.train_data)} train / {len(self.val_data)} val examples")

    def collator(self) -> SFTCollator:
        return SFTCollator(self._require_tokenizer().pad_token_id)

    def train_dataloader(self):
        return self._train_loader(self.train_data, self.collator())

    def val_dataloader(self):
        return self._eval_loader(self.val_data, self.collator()) if self.val_data else []
