"""Scorers: anything that maps prompts and responses to one score each (higher is better).

PPO calls `scorer(batch)` with a `ScoringBatch`; swap the reward model for a rule from YAML:

    scorer:
      class_path: alpaca_rlhf.modules.scorers.TokenSetScorer
      init_args: {words: [good, great, happy]}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.exports import TEMPLATE_FILE
from alpaca_rlhf.models import ModelSpec, load_reward_model
from alpaca_rlhf.modules.reward import score as reward_score


@dataclass
class ScoringBatch:
    """What a scorer sees of one rollout. B responses."""

    prompts: list[str]          # rendered prompts (template included)
    query_responses: Tensor     # (B, C+T) policy token ids: left-padded prompt, response, pad after EOS
    attention_mask: Tensor      # (B, C+T) 1 on real prompt and response tokens
    context_length: int         # C: responses start at this column
    policy_tokenizer: object    # the policy's tokenizer (for scorers that re-tokenise)
    texts: list[str] | None = None  # the responses as text if already known; else decoded on first use
    stop_ids: list[int] | None = None  # the ids that end a response (EOS, the template's end of turn); None = EOS

    @property
    def responses(self) -> list[str]:
        """Decoded responses, truncated after the first EOS, special tokens dropped. Decoded only when a scorer
        (or the sample log) asks: a reward model sharing the policy's vocabulary scores the ids directly."""
        if self.texts is None:
            self.texts = self.policy_tokenizer.batch_decode(self.query_responses[:, self.context_length :],
                                                            skip_special_tokens=True)
        return self.texts


class Scorer(nn.Module):
    """Base class: `forward(batch: ScoringBatch) -> Tensor (B,)` in float32, on the batch's device."""

    #: added to every raw score before PPO uses it (a reward model's held-out mean, negated)
    offset: float = 0.0

    def forward(self, batch: ScoringBatch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class RewardModelScorer(Scorer):
    """A merged reward model from the RM stage (plain sequence classifier), frozen, optionally 8/4-bit.

    Args:
        model: The merged reward model folder and how to load it (e.g. `quantization: 4bit`).
        center: Subtract the held-out mean score stored at export (`reward_stats.json`), so scores are centred.
        batch_size: Sequences per scoring forward pass.
    """

    def __init__(self, model: ModelSpec, center: bool = True, batch_size: int = 16) -> None:
        super().__init__()
        self.model, self.tokenizer, self.stats = load_reward_model(model)
        self.offset = -float(self.stats.get("mean", 0.0)) if center else 0.0
        self.batch_size = batch_size
        self.end_ids = reward_model_end_ids(model.name_or_path, self.tokenizer)
        self._same_vocab: bool | None = None

    def _shares_vocabulary(self, tokenizer) -> bool:
        if self._same_vocab is None:
            self._same_vocab = tokenizer.get_vocab() == self.tokenizer.get_vocab()
        return self._same_vocab

    @torch.no_grad()
    def forward(self, batch: ScoringBatch) -> Tensor:
        if self._shares_vocabulary(batch.policy_tokenizer):
            ids, mask = batch.query_responses, batch.attention_mask  # same vocabulary: score the ids as they are
        else:  # different tokenizers: decode (done by the caller) and re-tokenise as prompt + response text
            ids, mask = self.retokenize(batch)
        scores = [reward_score(self.model, ids[i : i + self.batch_size], mask[i : i + self.batch_size])
                  for i in range(0, ids.shape[0], self.batch_size)]
        return torch.cat(scores).float()

    def retokenize(self, batch: ScoringBatch) -> tuple[Tensor, Tensor]:
        """(ids, mask) in the reward model's vocabulary, right-padded: prompt + response text, and the reward
        model's end of response (its template's end of turn, or EOS) only where the policy's response ended, so
        an answer cut at max_new_tokens is scored as the unfinished answer it is."""
        texts = [p + r for p, r in zip(batch.prompts, batch.responses, strict=True)]
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        ended = batch_ended(batch).tolist()
        rows = [row + self.end_ids if end else row for row, end in zip(encoded, ended, strict=True)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = batch.query_responses.device
        return ids.to(device), mask.to(device)


def batch_ended(batch: ScoringBatch) -> Tensor:
    """(B,) bool: the policy's response holds a stop token (it finished rather than ran out of tokens)."""
    responses = batch.query_responses[:, batch.context_length :]
    valid = batch.attention_mask[:, batch.context_length :].bool()
    stop = torch.tensor(batch.stop_ids or [batch.policy_tokenizer.eos_token_id], device=responses.device)
    return (torch.isin(responses, stop) & valid).any(1).cpu()


def reward_model_end_ids(folder: str, tokenizer) -> list[int]:
    """The ids that closed every response the reward model was trained on: its template's end of turn under a
    chat template (`template.json` beside the weights), else EOS."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return [tokenizer.eos_token_id]
    try:
        return PromptTemplate.load(str(path)).end_of_turn_ids(tokenizer)
    except (ConfigError, OSError, ValueError):  # a chat template.json beside a tokenizer without one: EOS
        return [tokenizer.eos_token_id]


class TokenSetScorer(Scorer):
    """A rule-based reward: the fraction of a response's words that belong to `words` (a research toy).

    Args:
        words: The target words (case-insensitive).
        scale: Multiplier of the fraction.
    """

    def __init__(self, words: list[str], scale: float = 1.0) -> None:
        super().__init__()
        self.words, self.scale = {w.lower() for w in words}, scale

    def forward(self, batch: ScoringBatch) -> Tensor:
        fractions = []
        for response in batch.responses:
            tokens = response.lower().split()
            fractions.append(sum(t.strip(".,!?;:") in self.words for t in tokens) / max(1, len(tokens)))
        return torch.tensor(fractions, dtype=torch.float32, device=batch.query_responses.device) * self.scale


class TokenIdScorer(Scorer):
    """A rule-based reward on token ids: the fraction of valid response tokens whose id is in `token_ids`.

    Cheap and exact for tiny-model tests (no decoding).
    """

    def __init__(self, token_ids: list[int], scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.scale = scale

    def forward(self, batch: ScoringBatch) -> Tensor:
        responses = batch.query_responses[:, batch.context_length :]
        valid = batch.attention_mask[:, batch.context_length :].bool()
        hits = torch.isin(responses, self.token_ids) & valid
        return hits.sum(1).float() / valid.sum(1).clamp(min=1).float() * self.scale
