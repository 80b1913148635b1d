"""One split of the preference data for every stage: disjoint parts by normalized prompt.

Every stage that reads the preference data (the reward model, a trained judge, the RL prompts, DPO, the held-out
pairs, compare's evaluation prompts) takes its part from `part_of`, with the same `Partition`. A record's part
depends only on its prompt's *key* (the first user turn, lower-cased, punctuation and spacing folded) and the
seed, never on the file's order, its length, or which other records survive filtering. So:

- the parts are disjoint by prompt: two records that open with the same question (HH has ~6% such repeats, and
  the same opening across its subsets) always land in the same part, so no evaluation prompt is ever a
  training prompt, whichever stage trained on it;
- every stage and `compare` agree on the parts without passing lists of prompts around.

The parts, in order: `rm` (reward-model training pairs), `judge` (a trained judge's pairs, if any), `rl` (the
online methods' prompts), `dpo` (DPO's training pairs), `heldout` (pairs with human labels never trained on:
RM accuracy, judge agreement, validation during RL), `eval` (compare's prompts). Fractions may sum to less than
1 (the rest is unused); a fraction of 0 leaves the part empty.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from alpaca_rlhf.errors import ConfigError

PARTS = ("rm", "judge", "rl", "dpo", "heldout", "eval")
PartName = Literal["rm", "judge", "rl", "dpo", "heldout", "eval"]  # a stage's `part:` (the same names as PARTS)
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class Partition:
    """Fractions of the prompts in each part, and the seed of the assignment.

    Attributes:
        rm: Reward-model training pairs.
        judge: A trained judge's pairs (0 when the judge is an LLM that trains on nothing).
        rl: Prompts of PPO, RLOO and GRPO.
        dpo: DPO's training pairs.
        heldout: Labelled pairs no stage trains on: RM held-out accuracy and its baselines, the LLM judge's
            agreement with the human labels, validation during RL.
        eval: compare's prompts (the quality table's).
        seed: Seed of the assignment (a different seed, a different split).
    """

    rm: float = 0.35
    judge: float = 0.0
    rl: float = 0.25
    dpo: float = 0.2
    heldout: float = 0.1
    eval: float = 0.1
    seed: int = 42

    def __post_init__(self) -> None:
        fractions = self.fractions()
        if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
            raise ConfigError(f"partition: fractions must be >= 0 and sum to at most 1, got {fractions}")

    def fractions(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in PARTS}

    def part_of(self, key: str) -> str | None:
        """The part of a prompt key (None: in no part, when the fractions sum to less than 1)."""
        digest = hashlib.sha256(f"{self.seed}\x00{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        edge = 0.0
        for name, fraction in self.fractions().items():
            edge += fraction
            if u < edge:
                return name
        return None


def normalize(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space: "What's up?" and "what s up" are one prompt."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def first_user_turn(record: dict) -> str:
    """The text that opens a record's conversation: its first human/user turn or its instruction."""
    if isinstance(record.get("chosen"), str) and HUMAN in record["chosen"]:  # an HH dialogue
        return record["chosen"].split(HUMAN, 1)[1].split(ASSISTANT, 1)[0]
    for name in ("prompt", "messages", "chosen"):  # conversational records
        turns = record.get(name)
        if isinstance(turns, list):
            users = [m.get("content", "") for m in turns if isinstance(m, dict) and m.get("role") == "user"]
            if users:
                return users[0]
    for name in ("instruction", "user_input", "prompt"):
        if isinstance(record.get(name), str):
            return record[name] + ("\n" + record["input"] if isinstance(record.get("input"), str) else "")
    raise ValueError(f"no prompt in a record with keys {sorted(record)}")


def prompt_key(record: dict) -> str:
    """The key a record is split by: its normalized first user turn."""
    return normalize(first_user_turn(record))


def take_part(records: list[dict], partition: Partition, part: str) -> list[dict]:
    """The records of one part, in their order."""
    if part not in PARTS:
        raise ConfigError(f"partition: part must be one of {', '.join(PARTS)}, got {part!r}")
    return [r for r in records if partition.part_of(prompt_key(r)) == part]


def part_counts(records: list[dict], partition: Partition) -> dict[str, int]:
    counts = dict.fromkeys(PARTS, 0)
    for r in records:
        part = partition.part_of(prompt_key(r))
        if part is not None:
            counts[part] += 1
    return counts
