"""Prompts for the online stages: Alpaca instructions (or the seed's `user_input`, conversations, HH dialogues)
rendered with the SFT template. `PromptSource` says which prompts; `PromptDataModule` (the online stages' data)
and `compare` (its `--prompts`) both read them through it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from lightning.pytorch.utilities import rank_zero_info

from alpaca_rlhf.data.base import TokenizedDataModule
from alpaca_rlhf.data.partition import Partition, PartName, take_part
from alpaca_rlhf.data.preference import check_preference, render_hh_prompt
from alpaca_rlhf.data.records import (
    SUBSET_KEY,
    DataValidationError,
    LoadReport,
    check_messages,
    read_raw_records,
    string_field,
    validate_records,
)
from alpaca_rlhf.data.sft import encode_prompt, seeded_sample, seeded_split
from alpaca_rlhf.data.templates import PromptTemplate


def check_prompt(record: dict):
    """An Alpaca record (`instruction`, optional `input`), a seed preference record (`user_input`), or a
    conversation `{messages}` (a final assistant turn, if any, is dropped: the policy answers the rest), or an
    HH preference record `{chosen, rejected}` (its shared dialogue up to the last assistant turn)."""
    if "instruction" not in record and "messages" not in record and {"chosen", "rejected"} <= set(record):
        return check_preference(record, "hh")
    if "instruction" not in record and "messages" in record:
        problem = check_messages(record, last_role=None)
        if problem is None and not [m for m in prompt_messages(record["messages"]) if m["role"] == "user"]:
            return "messages", "has no user turn to answer"
        return problem
    if "instruction" not in record and "user_input" in record:
        return string_field(record, "user_input", non_empty=True)
    return string_field(record, "instruction", non_empty=True) or string_field(record, "input", required=False)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The turns the policy answers: a conversation without its final assistant turn."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def render_prompt(record: dict, template: PromptTemplate) -> str:
    """A prompt record rendered with `template` (bound to the tokenizer for chat templates)."""
    if "instruction" in record:
        return template.render(record["instruction"], record.get("input") or "")
    if "messages" in record:
        return template.render_messages(prompt_messages(record["messages"]))
    if "chosen" in record:
        return render_hh_prompt(record, template)
    return template.render(record["user_input"], record.get("input") or "")


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


def prompt_split(data_path: str | list[str], tokenizer, template: PromptTemplate, max_prompt_length: int,
                 val_set_size: int | float, seed: int, skip_bad_records: bool = False,
                 max_records: int | None = None, read_options: dict | None = None,
                 part: str | None = None, partition: Partition | None = None,
                 ) -> tuple[list[dict], list[dict], LoadReport]:
    """(train, held-out, report) prompt examples `{input_ids, prompt, record, subset}`: PPO's split, and the one
    `compare` evaluates on, from this one function so the two can never disagree.

    Order: validate (drop bad records if `skip_bad_records`), keep the first `max_records`, render, drop prompts
    longer than `max_prompt_length` tokens, then take a seeded hold-out of `val_set_size`. With `part` (of
    `partition`, `alpaca_rlhf.data.partition`), "train" is that part's prompts and the hold-out is drawn (seeded,
    at most `val_set_size`) from the `heldout` part: the split by prompt every stage shares.
    """
    records, report = validate_records(read_raw_records(data_path, **(read_options or {})), str(data_path),
                                       check_prompt, skip_bad_records)
    records = records[:max_records] if max_records else records
    template = template.bind(tokenizer)

    def render(chosen: list[dict]) -> list[dict]:
        examples = []
        for record in chosen:
            prompt = render_prompt(record, template)
            ids = encode_prompt(tokenizer, prompt)
            if len(ids) > max_prompt_length:
                report.dropped_too_long += 1
                continue
            examples.append({"input_ids": ids, "prompt": prompt, "record": record, "subset": record.get(SUBSET_KEY)})
        return examples

    if part is not None:
        partition = partition or Partition()
        train = render(take_part(records, partition, part))
        held = render(take_part(records, partition, "heldout")) if val_set_size and part != "heldout" else []
        return train, seeded_sample(held, val_set_size, seed), report
    examples = render(records)
    if not val_set_size:
        return examples, [], report
    train_idx, val_idx = seeded_split(len(examples), val_set_size, seed)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx], report


@dataclass
class PromptSource:
    """Which prompts, and how they split into train and held-out: every argument that decides which prompts a
    stage sees. `PromptDataModule` takes these (flat, as `data.init_args.<name>`), `compare` takes them as
    `--prompts.<name>`, and the pipeline hands the RL stage's to compare field by field, so compare evaluates on
    prompts the policy did not train on.

    Attributes:
        data_path: Hub dataset name, or a local file or folder of prompt records; or a list of these.
        val_set_size: Held-out prompts (count or fraction).
        seed: Seed of the hold-out split.
        max_prompt_length: Prompts with more tokens are dropped (and counted) before the split.
        skip_bad_records: Drop malformed records (counted and logged) instead of stopping with an error.
        max_records: Use only the first N valid records.
        part: This part of `partition` (`rl` to train on, `eval` to evaluate on), with the held-out prompts drawn
            from its `heldout` part; None = a seeded hold-out of the whole file.
        partition: The split's fractions and seed (the pipeline passes one to every stage).
        split: The split of a hub dataset.
        hub_config: A hub dataset's configuration name (its `name` in `datasets.load_dataset`).
        revision: A hub dataset's revision (branch, tag or commit).
        fields: Our field names -> the columns holding them, e.g. `{instruction: question, output: answer}`.
    """

    data_path: str | list[str] = "yahma/alpaca-cleaned"
    val_set_size: int | float = 64
    seed: int = 42
    max_prompt_length: int = 256
    skip_bad_records: bool = False
    max_records: int | None = None
    part: PartName | None = None
    partition: Partition | None = None
    split: str = "train"
    hub_config: str | None = None
    revision: str | None = None
    fields: dict[str, str] | None = None

    def read_options(self) -> dict:
        return dict(split=self.split, hub_config=self.hub_config, revision=self.revision, fields=self.fields)

    def split_prompts(self, tokenizer, template: PromptTemplate, val_set_size: int | float | None = None):
        """(train, held-out, LoadReport): rendered prompts (`prompt_split`); `val_set_size` overrides the field."""
        size = self.val_set_size if val_set_size is None else val_set_size
        return prompt_split(self.data_path, tokenizer, template, self.max_prompt_length, size, self.seed,
                            self.skip_bad_records, self.max_records, self.read_options(), self.part, self.partition)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class PromptDataModule(TokenizedDataModule):
    """Prompt batches for PPO; one batch is one PPO iteration (drop-last, so every iteration has `batch_size`).

    Args:
        data_path: Hub dataset name, or a local file (`.json`/`.jsonl`(`.gz`)/`.parquet`/`.csv`/`.arrow`) or folder
            of Alpaca records, `{user_input, ...}` records, conversations or HH dialogues; or a list of these.
        template: Bundled template name or a template JSON path (the SFT stage's); None = the stage model's
            `template` (the command line passes it on; alone, `alpaca`).
        max_prompt_length: Prompts with more tokens are dropped (and counted): cutting one would cut the template.
        val_set_size: Held-out prompts (count or fraction) on which validation measures the mean score.
        batch_size: Prompts per PPO iteration on each process (episodes = batch_size x processes).
        num_workers: DataLoader workers.
        seed: Seed of the hold-out split and of the shuffling.
        skip_bad_records: Drop malformed records (counted and logged) instead of stopping with an error.
        max_records: Use only the first N valid records.
        part: Train on this part of `partition` (`rl`) and validate on at most `val_set_size` prompts of its
            `heldout` part: the split by prompt every stage and `compare` share. None = a seeded hold-out.
        partition: The split's fractions and seed (the pipeline passes one to every stage).
        split: The split of a hub dataset.
        hub_config: A hub dataset's configuration name (its `name` in `datasets.load_dataset`).
        revision: A hub dataset's revision (branch, tag or commit).
        fields: Our field names -> the columns holding them, e.g. `{instruction: question, output: answer}`.
    """

    def __init__(
        self,
        data_path: str | list[str] = "yahma/alpaca-cleaned",
        template: str | None = None,
        max_prompt_length: int = 256,
        val_set_size: int | float = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 42,
        skip_bad_records: bool = False,
        max_records: int | None = None,
        part: PartName | None = None,
        partition: Partition | None = None,
        split: str = "train",
        hub_config: str | None = None,
        revision: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.source = PromptSource(data_path, val_set_size, seed, max_prompt_length, skip_bad_records, max_records,
                                   part, partition, split, hub_config, revision, fields)
        self.part, self.partition = part, partition
        self.read_options = self.source.read_options()
        self.data_path, self.max_prompt_length, self.val_set_size = data_path, max_prompt_length, val_set_size
        self.skip_bad_records, self.max_records = skip_bad_records, max_records
        self.template = PromptTemplate.load(template or "alpaca")
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None
        self.report = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        self.train_data, self.val_data, self.report = self.source.split_prompts(self._require_tokenizer(),
                                                                                 self.template)
        if len(self.train_data) < self.batch_size:
            raise DataValidationError(f"{self.data_path}: {len(self.train_data)} usable prompts, fewer than one batch "
                             f"of {self.batch_size} ({self.report.summary()})")
        rank_zero_info(f"{self.report.summary()}; {len(self.train_data)} train / {len(self.val_data)} val prompts")

    def collator(self) -> PromptCollator:
        return PromptCollator(self._require_tokenizer().pad_token_id)

    def train_dataloader(self):
        return self._train_loader(self.train_data, self.collator(), drop_last=True)

    def val_dataloader(self):
        return self._eval_loader(self.val_data, self.collator()) if self.val_data else []
