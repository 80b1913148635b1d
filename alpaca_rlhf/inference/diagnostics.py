"""What compare measures once the answers are written: template-following, win rates, the per-stage summary
(scores, KL, lengths, EOS, refusals, emptiness, diversity, judges) and the reward-hacking flags. Pure Python over
lists of numbers and texts: nothing here loads a model."""

from __future__ import annotations

import math

from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.evaluation import is_refusal, win_tie_loss
from alpaca_rlhf.inference.checkpoints import STAGES
from alpaca_rlhf.inference.generation import Generation, SamplingSpec


def follows_template(text: str, ended: bool, template: PromptTemplate) -> bool:
    """Answered and stopped: EOS within the budget, and no template section (`### ...:`) in the reply."""
    return ended and bool(text) and not any(s in text for s in template.section_markers())


def pairwise_outcomes(a: list[float], b: list[float]) -> list[float]:
    """Per pair: 1 where a beats b, 0.5 on a tie, 0 where b wins."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of pairs where a beats b, ties counting half."""
    return sum(pairwise_outcomes(a, b)) / len(a)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) if xs else float("nan")


def build_rows(records: list[dict], generations: dict[str, list[Generation]], scores: dict[str, list[float]],
               kl: list[float] | None, samples_per_prompt: int, template: PromptTemplate,
               judge: dict[str, list[float]] | None = None) -> list[dict]:
    """One row per prompt, stage and sample: what outputs.jsonl holds."""
    rows = []
    for stage, gens in generations.items():
        for j, g in enumerate(gens):
            rows.append({
                "prompt_id": j // samples_per_prompt, "sample": j % samples_per_prompt, "stage": stage,
                "instruction": records[j // samples_per_prompt]["instruction"],
                "input": records[j // samples_per_prompt]["input"], "response": g.text,
                "score": scores[stage][j] if stage in scores else None,
                "judge_score": judge[stage][j] if judge and stage in judge else None,
                "response_tokens": len(g.response_ids),
                "ended_with_eos": g.ended, "follows_template": follows_template(g.text, g.ended, template),
                "kl_to_sft": kl[j] if stage == "rlhf" and kl is not None else None,
            })
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(rows, key=lambda r: (r["prompt_id"], order[r["stage"]], r["sample"]))


def summarize(stages: list[str], rows: list[dict], scores: dict[str, list[float]], kl: list[float] | None,
              samples_per_prompt: int, sampling: SamplingSpec, judge: dict[str, list[float]] | None = None) -> dict:
    """Per stage: score mean/std, template-following and EOS rates, length and the reward-hacking diagnostics;
    RLHF vs SFT: win rate (by the reward model and the judge) and KL."""
    judge = judge or {}
    per_stage = {}
    for stage in stages:
        mine = [r for r in rows if r["stage"] == stage]
        lengths = [float(r["response_tokens"]) for r in mine]
        texts = [r["response"] for r in mine]
        per_stage[stage] = {
            "score_mean": _mean(scores[stage]) if stage in scores else None,
            "score_std": _std(scores[stage]) if stage in scores else None,
            "judge_mean": _mean(judge[stage]) if stage in judge else None,
            "follows_template": _mean([float(r["follows_template"]) for r in mine]),
            "ended_with_eos": _mean([float(r["ended_with_eos"]) for r in mine]),
            "max_length_hit": _mean([float(not r["ended_with_eos"] and r["response_tokens"] >= sampling.max_new_tokens)
                                     for r in mine]),
            "response_tokens": _mean(lengths),
            "empty": _mean([float(not r["response"]) for r in mine]),
            "refusal": _mean([float(is_refusal(r["response"])) for r in mine]),
            "length_score_corr": _corr([r["score"] for r in mine], lengths) if stage in scores else None,
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "repeated_3gram": _mean([float(has_repeated_ngram(t, 3)) for t in texts]),
        }
    summary: dict = {"stages": per_stage}
    anchors = {k.split("/", 1)[1]: _mean(v) for k, v in scores.items() if k.startswith("anchor/")}
    if anchors:
        summary["reward_anchors"] = anchors

    def per_prompt(xs: list[float]) -> list[float]:  # mean over a prompt's samples
        return [_mean(xs[i : i + samples_per_prompt]) for i in range(0, len(xs), samples_per_prompt)]

    if "rlhf" in scores and "sft" in scores:
        by_rm = win_tie_loss(pairwise_outcomes(per_prompt(scores["rlhf"]), per_prompt(scores["sft"])))
        summary["rlhf_vs_sft"] = {"win_rate": by_rm["win_rate"], "win_rate_ci95": by_rm["ci95"], "by_rm": by_rm,
                                  "score_gain": _mean(scores["rlhf"]) - _mean(scores["sft"]),
                                  "n_prompts": len(per_prompt(scores["rlhf"]))}
        if "rlhf" in judge and "sft" in judge:
            by_judge = win_tie_loss(pairwise_outcomes(per_prompt(judge["rlhf"]), per_prompt(judge["sft"])))
            summary["rlhf_vs_sft"]["judge_win_rate"] = by_judge["win_rate"]
            summary["rlhf_vs_sft"]["judge_win_rate_ci95"] = by_judge["ci95"]
            summary["rlhf_vs_sft"]["judge_gain"] = _mean(judge["rlhf"]) - _mean(judge["sft"])
    if kl is not None:
        summary["kl_rlhf_to_sft"] = {"mean": _mean(kl), "std": _std(kl), "n": len(kl)}
    summary["reward_hacking"] = hacking_flags(summary)
    return summary


def _corr(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant."""
    mx, my = _mean(xs), _mean(ys)
    sx, sy = _std(xs), _std(ys)
    if not xs or sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (len(xs) * sx * sy)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams over all n-grams of a stage's responses."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repeated_ngram(text: str, n: int) -> bool:
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def hacking_flags(summary: dict) -> list[str]:
    """Plain-language signs that RLHF games its reward model, from the comparison's own numbers."""
    stages, flags = summary["stages"], []
    if "rlhf" not in stages or "sft" not in stages:
        return flags
    rlhf, sft = stages["rlhf"], stages["sft"]
    versus = summary.get("rlhf_vs_sft", {})
    if versus.get("score_gain", 0) > 0 and versus.get("judge_gain", 0) < 0:
        flags.append(f"the optimised reward model's score rose ({versus['score_gain']:+.3f}) while the independent "
                     f"judge's fell ({versus['judge_gain']:+.3f}): over-optimisation (Gao et al., 2022)")
    ratio = rlhf["response_tokens"] / max(sft["response_tokens"], 1e-9)
    # the reward model's taste for length shows best where lengths vary: on SFT's responses as well as RLHF's
    corrs = [(name, stages[name]["length_score_corr"]) for name in ("sft", "rlhf")
             if stages[name]["length_score_corr"] is not None]
    name, corr = max(corrs, key=lambda c: abs(c[1]), default=(None, None))
    if (ratio > 1.5 or ratio < 0.5) and corr is not None and abs(corr) > 0.3 and (corr > 0) == (ratio > 1):
        what = "length" if ratio > 1 else "brevity"
        flags.append(f"RLHF responses are {ratio:.2f}x the SFT length and the reward model's score "
                     f"{'rises' if corr > 0 else 'falls'} with length (r = {corr:+.2f} on {name.upper()}'s "
                     f"responses): the policy may be buying reward with {what}")
    if rlhf["empty"] > sft["empty"] + 0.05:
        flags.append(f"empty responses rose from {sft['empty']:.0%} to {rlhf['empty']:.0%}")
    if sft["distinct_2"] - rlhf["distinct_2"] > 0.15:
        flags.append(f"distinct-2 fell from {sft['distinct_2']:.2f} to {rlhf['distinct_2']:.2f}: the policy repeats "
                     "itself or collapsed onto a few phrasings")
    if rlhf["max_length_hit"] > sft["max_length_hit"] + 0.2:
        flags.append(f"responses that run to the length limit rose from {sft['max_length_hit']:.0%} to "
                     f"{rlhf['max_length_hit']:.0%}")
    return flags
