"""Scoring compare's answers: by a reward model or a trained judge (a sequence classifier), and by the pairwise
LLM judge, validated on held-out pairs before its verdicts are counted."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alpaca_rlhf.data.prompts import PromptSource
from alpaca_rlhf.data.sft import encode_prompt
from alpaca_rlhf.evaluation import win_tie_loss
from alpaca_rlhf.inference.checkpoints import STAGE_TITLES
from alpaca_rlhf.inference.generation import (
    Generation,
    model_device,
    pad_prompt_responses,
)
from alpaca_rlhf.inference.judge import (
    JudgedPair,
    PairwiseJudge,
    format_validation,
    heldout_pairs,
    outcomes_from_log_odds,
    validate,
)
from alpaca_rlhf.models import ModelSpec
from alpaca_rlhf.modules.scorers import RewardModelScorer, ScoringBatch

log = logging.getLogger(__name__)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ids(generations: list[Generation]) -> tuple[list[list[int]], list[list[int]]]:
    return [g.prompt_ids for g in generations], [g.response_ids for g in generations]


def run_llm_judge(model: str, records: list[dict], generations: dict[str, list[Generation]], prompts: PromptSource,
                  n_pairs: int, rule: str, samples_per_prompt: int, dtype: str | None) -> dict:
    """The LLM judge's validation on held-out human labels, then RLHF vs SFT on every prompt (its first sample),
    both orders: win / tie / loss with a paired-bootstrap 95% interval."""
    t0 = time.time()
    the_judge = PairwiseJudge(model, dtype=dtype or "float32")
    validation = None
    if n_pairs and prompts.part is not None:
        validation = validate(the_judge, heldout_pairs(prompts.data_path, prompts.partition, n_pairs, prompts.seed))
        log.info("compare: %s", format_validation(validation))
    first = range(0, len(generations["rlhf"]), samples_per_prompt)
    pairs = [JudgedPair(records[i // samples_per_prompt]["conversation"], generations["rlhf"][i].text,
                        generations["sft"][i].text) for i in first]
    forward, backward = the_judge.both_orders(pairs)
    outcomes = outcomes_from_log_odds(forward, backward, rule)
    other = "debiased" if rule == "both_orders" else "both_orders"
    result = {"model": model, "rule": rule, "rlhf_vs_sft": win_tie_loss(outcomes), "outcomes": outcomes,
              f"rlhf_vs_sft_{other}": win_tie_loss(outcomes_from_log_odds(forward, backward, other)),
              "validation": validation,
              "reliable": validation[rule]["reliable"] if validation else None,
              "agreement": validation[rule]["agreement"] if validation else None,
              "seconds": round(time.time() - t0, 1)}
    per_subset: dict[str, list[float]] = {}
    for i, o in zip(first, outcomes, strict=True):
        per_subset.setdefault(str(records[i // samples_per_prompt].get("subset")), []).append(o)
    if len(per_subset) > 1:
        result["rlhf_vs_sft_by_subset"] = {k: win_tie_loss(v) for k, v in sorted(per_subset.items())}
    del the_judge
    _release_memory()
    return result


def _usable_judge(path: str | None) -> str | None:
    """The judge's path with `~` expanded; None (with a warning saying how to fetch it) for a missing local file."""
    if not path:
        return None
    expanded = str(Path(path).expanduser())
    if expanded.endswith(".gguf") and not Path(expanded).is_file():
        log.warning("compare: the LLM judge %s is absent: no LLM-judge verdict in this report. Fetch it with "
                    "../shared/tools/get-judge-model.sh (Qwen2.5-Coder-0.5B-Instruct) or give --llm_judge a model",
                    expanded)
        return None
    return expanded


def score_generations(reward_model: str, records: list[dict], generations: dict[str, list[Generation]],
                      tokenizers: dict, samples_per_prompt: int, batch_size: int,
                      load_kwargs: dict, stop_ids: dict[str, list[int]] | None = None
                      ) -> tuple[dict[str, list[float]], dict]:
    """Reward-model scores of every response, exactly as PPO's `RewardModelScorer` scores rollouts.

    Also scores two anchors on the same prompts, so a reader can judge the scale and spot reward hacking:
    an empty response (EOS at once) and, where the records have one, the dataset's own answer.

    Returns:
        ({stage: scores in generation order, "anchor/<name>": scores per prompt}, the RM's reward_stats.json).
    """
    cuda = torch.cuda.is_available()
    spec = ModelSpec(name_or_path=reward_model,
                     dtype=load_kwargs["dtype"] or ("bfloat16" if cuda else "float32"),
                     quantization="8bit" if load_kwargs["load_in_8bit"] else None)
    scorer = RewardModelScorer(spec, center=False, batch_size=batch_size)
    if cuda and not load_kwargs["load_in_8bit"]:
        scorer = scorer.to("cuda")
    prompts = [r["prompt"] for r in records for _ in range(samples_per_prompt)]
    scores = {stage: _score_all(scorer, prompts, gens, tokenizers[stage], batch_size, STAGE_TITLES[stage],
                                (stop_ids or {}).get(stage))
              for stage, gens in generations.items()}
    anchors = {"empty response": [""] * len(records)}
    if all(r.get("reference") for r in records):
        anchors["dataset answer"] = [r["reference"] for r in records]
    tok = scorer.tokenizer
    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in records]
    for name, texts in anchors.items():
        gens = [Generation(p, tok(t, add_special_tokens=False)["input_ids"] + scorer.end_ids, t, True)
                for p, t in zip(prompt_ids, texts, strict=True)]
        scores[f"anchor/{name}"] = _score_all(scorer, [r["prompt"] for r in records], gens, tok, batch_size,
                                              stop_ids=scorer.end_ids[-1:])
    stats = scorer.stats
    del scorer
    _release_memory()
    return scores, stats


def _score_all(scorer, prompts: list[str], gens: list[Generation], tokenizer, batch_size: int,
               label: str = "", stop_ids: list[int] | None = None) -> list[float]:
    device = model_device(scorer.model)
    values = []
    for i in tqdm(range(0, len(gens), batch_size), desc=f"compare: scoring {label}", unit="batch", leave=False):
        chunk = gens[i : i + batch_size]
        ids, mask, C = pad_prompt_responses(*_ids(chunk), tokenizer.pad_token_id)
        batch = ScoringBatch(prompts[i : i + batch_size], ids.to(device), mask.to(device), C, tokenizer,
                             texts=[g.text for g in chunk], stop_ids=stop_ids)
        values.extend(scorer(batch).tolist())
    return values
