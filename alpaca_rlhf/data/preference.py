"""Preference pairs for the reward model: one prompt, a preferred and a rejected response.

Four record shapes load by configuration alone (`format: auto` detects them from a sample of records):

- `seed`: the seed's `comparision_data.json`, `{user_input, completion_a, completion_b}`. There is no label
  field: `completion_a` is always the preferred completion.
- `prompt_chosen_rejected`: `{prompt, chosen, rejected}` (TRL's standard preference shape), plain strings.
- `hh`: Anthropic HH-RLHF, `{chosen, rejected}`, each a whole `\\n\\nHuman: ... \\n\\nAssistant: ...`
  dialogue; the two share the prompt and differ in the last assistant turn.
- `conversational`: TRL's conversational preference shape, `{chosen, rejected}` lists of `{role, content}`
  messages ending in the assistant's response, with the prompt either shared by both or given as `prompt`
  (a list of messages).

Every shape is rendered with the same template as SFT and PPO (Alpaca text, or the tokenizer's chat template
with `template: chat`): the user's text is the instruction (the seed's optional `input` its Input section;
for HH, the last human turn, with the earlier turns as the template's `input`), the responses follow it.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from alpaca_rlhf.data.base import TokenizedDataModule
from alpaca_rlhf.data.partition import Partition, PartName, take_part
from alpaca_rlhf.data.records import (
    SUBSET_KEY,
    DataValidationError,
    LoadReport,
    check_messages,
    read_raw_records,
    string_field,
    validate_records,
)
from alpaca_rlhf.data.sft import encode_prompt, encode_response, seeded_sample, seeded_split
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError

log = logging.getLogger(__name__)

# (prompt field or None, preferred field, rejected field) of each shape
FORMATS = {
    "seed": ("user_input", "completion_a", "completion_b"),
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "hh": (None, "chosen", "rejected"),
    "conversational": (None, "chosen", "rejected"),
}
DETECT_SAMPLE = 100  # records `format: auto` looks at
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One comparison, rendered: `prompt` is the full template text ending where a response begins."""

    prompt: str
    chosen: str
    rejected: str


def record_format(record: dict) -> str | None:
    """The shape one record has, from its keys and value types, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"chosen", "rejected"} <= keys and isinstance(record["chosen"], list):
        return "conversational"
    for name in ("seed", "prompt_chosen_rejected", "hh"):
        if {k for k in FORMATS[name] if k} <= keys:
            return name
    return None


def detect_format(records: list, source: str = "data") -> str:
    """The shape of a file: the most common shape among the first records that are valid in their shape.

    One malformed first record cannot decide it; the choice is logged.
    """
    votes: dict[str, int] = {}
    for record in records[:DETECT_SAMPLE]:
        fmt = record_format(record)
        if fmt is not None and check_preference(record, fmt) is None:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        first = records[0] if records else {}
        keys = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise DataValidationError(
            f"{source}: cannot tell the preference format: none of the first {min(len(records), DETECT_SAMPLE)} "
            f"records is a valid {{user_input, completion_a, completion_b}}, {{prompt, chosen, rejected}}, "
            f"HH dialogue {{chosen, rejected}} or conversational {{chosen: [messages], rejected: [messages]}} "
            f"record (record 0 has keys {keys}); set data.format to see what is wrong with each record")
    fmt = max(votes, key=votes.get)
    log.info("%s: format auto -> %s (%d of the first %d records valid as such)", source, fmt, votes[fmt],
             min(len(records), DETECT_SAMPLE))
    return fmt


class _BadDialogue(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str, str]:
    """(instruction, context, chosen response, rejected response) of an HH pair.

    The prompt is the text the two dialogues share, up to and including the last `\\n\\nAssistant:` marker
    within it (as TRL's `extract_prompt`); the responses are what follows. The prompt's last human turn is the
    instruction and the dialogue before it the context.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise _BadDialogue("chosen", f"shares no '{ASSISTANT.strip()}' turn with 'rejected'")
    prompt = chosen[:cut]
    start = prompt.rfind(HUMAN)
    if start < 0:
        raise _BadDialogue("chosen", f"has no '{HUMAN.strip()}' turn before the last assistant turn")
    instruction = prompt[start + len(HUMAN):].strip()
    if not instruction:
        raise _BadDialogue("chosen", "has an empty last human turn")
    context = prompt[:start].strip()
    response_start = cut + len(ASSISTANT)
    return instruction, context, chosen[response_start:].strip(), rejected[response_start:].strip()


def hh_messages(chosen: str, rejected: str) -> list[dict]:
    """The shared dialogue of an HH pair as chat messages (`Human:` -> user, `Assistant:` -> assistant), ending
    with the human turn the two responses answer."""
    shared = os.path.commonprefix([chosen, rejected])
    prompt = chosen[: shared.rfind(ASSISTANT)]
    messages = []
    for part in re.split(r"(\n\nHuman:|\n\nAssistant:)", prompt)[1:]:
        if part in (HUMAN, ASSISTANT):
            messages.append({"role": "user" if part == HUMAN else "assistant", "content": ""})
        elif messages:
            messages[-1]["content"] += part
    return [{**m, "content": m["content"].strip()} for m in messages]


def render_hh_prompt(record: dict, template: PromptTemplate) -> str:
    """An HH pair's prompt: as chat turns with a chat template; else the last human turn as the instruction and
    the dialogue before it as the input."""
    if template.chat:
        return template.render_messages(hh_messages(record["chosen"], record["rejected"]))
    instruction, context, _, _ = split_hh_dialogue(record["chosen"], record["rejected"])
    return template.render(instruction, context)


def check_preference(record: dict, fmt: str):
    """(field, problem) if the record is unusable in shape `fmt`, else None."""
    if fmt == "conversational":
        return check_conversational(record)
    prompt_key, chosen_key, rejected_key = FORMATS[fmt]
    if fmt == "prompt_chosen_rejected" and isinstance(record.get(chosen_key), list):
        return check_conversational(record)
    problem = (
        (prompt_key and string_field(record, prompt_key, non_empty=True))
        or string_field(record, chosen_key, non_empty=True)
        or string_field(record, rejected_key, non_empty=True)
        or (fmt == "seed" and string_field(record, "input", required=False))
    )
    if problem:
        return problem
    chosen, rejected = record[chosen_key], record[rejected_key]
    if fmt == "hh":
        try:
            _, _, chosen, rejected = split_hh_dialogue(chosen, rejected)
        except _BadDialogue as e:
            return e.field, e.problem
        if not chosen:
            return chosen_key, "has an empty last assistant turn"
        if not rejected:
            return rejected_key, "has an empty last assistant turn"
    if chosen.strip() == rejected.strip():
        return rejected_key, f"equals '{chosen_key}' (a pair needs two different responses)"
    return None


def conversational_parts(record: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen response, rejected response) of a conversational record."""
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = list(record.get("prompt") or [])
    return prompt + chosen[:-1], chosen[-1]["content"].strip(), rejected[-1]["content"].strip()


def check_conversational(record: dict):
    for name in ("chosen", "rejected"):
        problem = check_messages(record, name, last_role="assistant") if record.get("prompt") is None \
            else _check_turns(record, name)
        if problem:
            return problem
    if record.get("prompt") is not None:
        problem = check_messages(record, "prompt", last_role=None)
        if problem:
            return problem
    elif record["chosen"][:-1] != record["rejected"][:-1]:
        return "rejected", "does not share the conversation before the last turn with 'chosen'"
    prompt, chosen, rejected = conversational_parts(record)
    if not any(m["role"] == "user" for m in prompt):
        return "prompt" if record.get("prompt") is not None else "chosen", "has no user turn before the response"
    if chosen == rejected:
        return "rejected", "equals 'chosen' (a pair needs two different responses)"
    return None


def _check_turns(record: dict, name: str):
    problem = check_messages(record, name, last_role=None)
    if problem:
        return problem
    last = record[name][-1]
    if last["role"] != "assistant" or not last["content"].strip():
        return f"{name}[{len(record[name]) - 1}]", "must be a non-empty assistant turn (the response)"
    return None


def render_pair(record: dict, fmt: str, template: PromptTemplate) -> PreferencePair:
    """The rendered prompt and the two responses of a validated record (`template` bound for chat)."""
    if fmt == "conversational" or isinstance(record.get("chosen"), list):
        prompt, chosen, rejected = conversational_parts(record)
        return PreferencePair(template.render_messages(prompt), chosen, rejected)
    if fmt == "hh":
        _, _, chosen, rejected = split_hh_dialogue(record["chosen"], record["rejected"])
        return PreferencePair(render_hh_prompt(record, template), chosen, rejected)
    prompt_key, chosen_key, rejected_key = FORMATS[fmt]
    return PreferencePair(template.render(record[prompt_key].strip(), (record.get("input") or "").strip()),
                          record[chosen_key].strip(), record[rejected_key].strip())


def tokenize_pair(
    tokenizer, pair: PreferencePair, max_length: int, add_eos_token: bool = True, end_ids: list[int] | None = None
) -> dict | None:
    """Prompt + chosen and prompt + rejected ids, at most `max_length` each; None if a response cannot fit.

    Responses are never cut: the shared prompt is truncated from the left (keeping BOS) to leave room for the
    longer response, so both sequences keep the same prompt. A pair whose longer response leaves no room
    for at least one prompt token is dropped (None).
    """
    prompt_ids = encode_prompt(tokenizer, pair.prompt)
    chosen_ids = encode_response(tokenizer, pair.chosen, add_eos_token, end_ids)
    rejected_ids = encode_response(tokenizer, pair.rejected, add_eos_token, end_ids)
    room = max_length - max(len(chosen_ids), len(rejected_ids))
    if room < 1:
        return None
    truncated = len(prompt_ids) > room
    if truncated:
        bos = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []
        # keep the prompt's end, next to the response ("### Response:"), and BOS
        prompt_ids = bos + prompt_ids[len(prompt_ids) - room + len(bos):]
    return {"chosen_input_ids": prompt_ids + chosen_ids, "rejected_input_ids": prompt_ids + rejected_ids,
            "prompt_length": len(prompt_ids), "truncated": truncated}


@dataclass
class PreferenceCollator:
    """Stacks a batch of B pairs into one (2B, T) batch: rows [0, B) chosen, rows [B, 2B) rejected.

    Padding goes on `padding_side`; `attention_mask` is 1 on real tokens, which is all `score` needs to find
    each sequence's last token under either side; with `response_mask`, a third tensor is True on the response
    tokens (after the shared prompt), which DPO sums log-probabilities over.
    """

    pad_token_id: int
    padding_side: str = "right"
    response_mask: bool = False  # add DPO's mask of response tokens

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # DPO's log-probs: responses only
        prompt_lengths = [p.get("prompt_length") for p in pairs] * 2
        for i, s in enumerate(sequences):
            start = width - len(s) if self.padding_side == "left" else 0
            input_ids[i, start : start + len(s)] = torch.tensor(s)
            attention_mask[i, start : start + len(s)] = 1
            if prompt_lengths[i] is not None:
                response_mask[i, start + prompt_lengths[i] : start + len(s)] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        return {**batch, "response_mask": response_mask} if self.response_mask else batch


def build_shuffled_pairs(records: list[dict], seed: int = 0) -> list[dict]:
    """Seed-format pairs from Alpaca records: the real output preferred over the same words shuffled."""
    return build_preference_pairs(records, seed, truncate_fraction=0.0)


def build_preference_pairs(records: list[dict], seed: int = 0, truncate_fraction: float = 0.5) -> list[dict]:
    """Seed-format pairs from Alpaca records: the real output preferred over a corrupted copy of it.

    The corruption is, at random, the same words shuffled (word order matters) or, with probability
    `truncate_fraction`, only the first third or less of the words (an answer must be complete: without such
    pairs a reward model trained on shuffles alone rates an empty response above a real one, and PPO learns to
    say nothing). Records whose output has fewer than two distinct words cannot be corrupted into something
    different and are left out. The instruction is `user_input` and a non-empty input stays `input`, so the
    prompt renders with the template's Input section exactly as SFT and PPO render it.
    """
    rng = random.Random(seed)
    pairs = []
    for record in records:
        words = record["output"].split()
        if len(set(words)) < 2:
            continue
        if truncate_fraction > 0 and len(words) >= 3 and rng.random() < truncate_fraction:
            rejected = " ".join(words[: rng.randint(1, max(1, len(words) // 3))])
        else:
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            rejected = " ".join(shuffled)
        pair = {"user_input": record["instruction"], "completion_a": record["output"], "completion_b": rejected}
        if record.get("input"):
            pair["input"] = record["input"]
        pairs.append(pair)
    return pairs


def parse_part(part: str | None) -> tuple[int, int] | None:
    """"k/n" -> (k, n) with 1 <= k <= n."""
    if part is None:
        return None
    try:
        k, n = (int(x) for x in str(part).split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ConfigError(f"data.train_part must be 'k/n' with 1 <= k <= n (e.g. '1/2'), got {part!r}")
    return k, n


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs rendered with the prompt template, batched as stacked chosen/rejected sequences.

    Args:
        data_path: Local `.json`/`.jsonl`(`.gz`)/`.parquet`/`.csv`/`.arrow` file, a folder of them (subfolders
            too), a hub dataset name (e.g. `comparision_data.json`), or a list of these (a mix, e.g. HH harmless +
            helpful; reports then show each file's subset).
        format: Record shape: "auto" (the most common valid shape among the first records), "seed",
            "prompt_chosen_rejected", "hh" or "conversational".
        template: Bundled template name (`alpaca`, `chat`) or a template JSON path (the same as SFT's and PPO's);
            None = the stage model's `template` (the command line passes it on; alone, `alpaca`).
        max_length: Maximum tokens of prompt + response; prompts are cut from the left, pairs whose response
            alone does not fit are dropped and counted.
        add_eos_token: End every response (the score is read at the last token): with the chat template's
            end-of-turn token under `template: chat`, else with EOS.
        val_set_size: Held-out pairs (count, or a fraction below 1), chosen with `seed`.
        batch_size: Pairs per micro-batch (the model sees twice as many sequences).
        num_workers: DataLoader workers.
        seed: Seed of the hold-out split and of the shuffling.
        skip_bad_records: Drop malformed records (counted and logged) instead of stopping with an error.
        max_records: Use only the first N valid records (quick runs).
        train_part: "k/n" trains on the k-th of n disjoint parts of the training pairs (every n-th pair from the
            k-th); the held-out pairs stay the same. Two reward models on "1/2" and "2/2" never share a pair:
            the second is an independent judge of the first's optimisation. None = all training pairs.
        part: Take the pairs of this part of `partition` (rm, judge, dpo, ...) to train on and the `heldout` part
            to validate on (at most `val_set_size` of them, seeded): every stage and `compare` split the data
            by prompt with the same function (`alpaca_rlhf.data.partition`). None = the seeded hold-out of
            `val_set_size` below.
        partition: The split's fractions and seed (the pipeline passes one to every stage).
        response_mask: Add each sequence's response-token mask to the batches (DPO needs it; `DPOModule` turns
            it on by itself).
        split: The split of a hub dataset.
        hub_config: A hub dataset's configuration name (its `name` in `datasets.load_dataset`).
        revision: A hub dataset's revision (branch, tag or commit).
        fields: Our field names -> the columns holding them, e.g. `{instruction: question, output: answer}`.
    """

    def __init__(
        self,
        data_path: str | list[str] = "comparision_data.json",
        format: Literal["auto", "seed", "prompt_chosen_rejected", "hh", "conversational"] = "auto",
        template: str | None = None,
        max_length: int = 512,
        add_eos_token: bool = True,
        val_set_size: int | float = 2000,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        skip_bad_records: bool = False,
        max_records: int | None = None,
        train_part: str | None = None,
        part: PartName | None = None,
        partition: Partition | None = None,
        response_mask: bool = False,
        split: str = "train",
        hub_config: str | None = None,
        revision: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.read_options = dict(split=split, hub_config=hub_config, revision=revision, fields=fields)
        self.train_part = parse_part(train_part)
        self.part, self.partition = part, partition or Partition()
        self.response_mask = response_mask
        if format not in ("auto", *FORMATS):
            raise ConfigError(f"data.format must be 'auto' or one of {sorted(FORMATS)}, got {format!r}")
        self.save_hyperparameters()
        self.data_path, self.format, self.max_length = data_path, format, max_length
        self.add_eos_token, self.val_set_size = add_eos_token, val_set_size
        self.skip_bad_records, self.max_records = skip_bad_records, max_records
        self.template = PromptTemplate.load(template or "alpaca")
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None
        self.report: LoadReport | None = None

    def load_records(self) -> tuple[list[dict], str]:
        """(validated records, their shape); raises `DataValidationError` on the first bad record unless
        skipping."""
        raw = read_raw_records(self.data_path, **self.read_options)
        fmt = detect_format(raw, str(self.data_path)) if self.format == "auto" else self.format
        records, self.report = validate_records(raw, str(self.data_path), lambda r: check_preference(r, fmt),
                                                self.skip_bad_records)
        return (records[: self.max_records] if self.max_records else records), fmt

    def load_pairs(self) -> list[PreferencePair]:
        """Validated, rendered pairs; raises `DataValidationError` on the first bad record unless skipping."""
        records, fmt = self.load_records()
        template = self.template.bind(self._require_tokenizer())
        return [render_pair(r, fmt, template) for r in records]

    def _examples(self, records: list[dict], fmt: str) -> list[dict]:
        tokenizer = self._require_tokenizer()
        template = self.template.bind(tokenizer)
        end_ids = template.end_of_turn_ids(tokenizer)  # a chat template's end of turn, else EOS
        examples = []
        for record in records:
            pair = render_pair(record, fmt, template)
            ex = tokenize_pair(tokenizer, pair, self.max_length, self.add_eos_token, end_ids)
            if ex is None:
                self.report.dropped_too_long += 1
                continue
            self.report.truncated += ex["truncated"]
            # the texts and the subset travel along for the held-out report (accuracy beside length rules)
            examples.append({**ex, "chosen": pair.chosen, "rejected": pair.rejected,
                             "subset": record.get(SUBSET_KEY)})
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        records, fmt = self.load_records()
        if self.part is not None:  # the shared split: train on one part, validate on the held-out part
            train = self._examples(take_part(records, self.partition, self.part), fmt)
            val = self._examples(take_part(records, self.partition, "heldout"), fmt) if self.val_set_size else []
            val = seeded_sample(val, self.val_set_size, self.seed)
            if not train:
                raise DataValidationError(f"{self.data_path}: part {self.part!r} of the partition holds no pair "
                                          f"that fits max_length={self.max_length}")
        else:
            examples = self._examples(records, fmt)
            if not examples:
                raise DataValidationError(f"{self.data_path}: no pair fits max_length={self.max_length}")
            train_idx, val_idx = (seeded_split(len(examples), self.val_set_size, self.seed) if self.val_set_size
                                  else (list(range(len(examples))), []))
            train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
        if self.train_part is not None:
            k, n = self.train_part
            train = train[k - 1 :: n]
        self.train_data, self.val_data = train, val
        n_train, n_val = len(self.train_data), len(self.val_data)
        where = f" (part {self.part!r}, held-out part 'heldout')" if self.part else ""
        rank_zero_info(f"{self.report.summary()}; {n_train} train / {n_val} val pairs{where}")

    def collator(self) -> PreferenceCollator:
        tokenizer = self._require_tokenizer()
        return PreferenceCollator(tokenizer.pad_token_id, tokenizer.padding_side, self.response_mask)

    def train_dataloader(self):
        return self._train_loader(self.train_data, self.collator())

    def val_dataloader(self):
        return self._eval_loader(self.val_data, self.collator()) if self.val_data else []
