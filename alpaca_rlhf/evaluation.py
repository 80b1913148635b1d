"""Evidence, not just numbers: intervals, the rules a reward model must beat, and win / tie / loss.

- `wilson_interval`: the 95% interval of an accuracy (k of n right).
- `paired_bootstrap`: the 95% interval of a win rate over prompts (resampling prompts, each prompt's outcome
  kept whole: the pairing of the two models' answers to one prompt stays intact).
- `rule_accuracies`: what "prefer the shorter", "prefer the longer" and "prefer the refusal" score on the same
  pairs. A reward model that does not beat the best of them by a clear margin has learned a length or refusal
  rule, not a taste: on HH harmless-base "prefer the shorter" alone scores 0.561.
- `accuracy_report`: a reward model's (or a judge's) held-out accuracy beside those rules, overall and per
  subset, with the flag.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

Z95 = 1.959963984540054
# A response refuses when it contains one of these (lower-cased) phrases. The list is the usual refusal
# openings of assistants trained on HH-style data; words such as "illegal" are left out, since helpful
# answers use them too.
REFUSAL_PHRASES = (
    "i'm sorry", "i am sorry", "sorry, but", "i apologize", "i can't", "i cannot", "i can not", "i won't",
    "i will not", "i'm not able", "i am not able", "i'm unable", "i am unable", "i don't think i can",
    "i'm not comfortable", "i am not comfortable", "i don't feel comfortable", "i'd rather not", "i would rather not",
    "as an ai", "as a language model", "not appropriate", "that's not something", "it is not appropriate",
    "it's not appropriate", "i don't want to", "i do not want to", "i'm not going to", "i am not going to",
    "i'd prefer not", "i can't help", "i cannot help",
)
CLEAR_MARGIN = 0.07  # an RM must beat the best rule by this much (7 points)
UNRELIABLE_JUDGE = 0.60  # a judge that agrees with human labels less often is reported as unreliable


def is_refusal(text: str) -> bool:
    low = text.lower().replace("\u2019", "'")
    return any(p in low for p in REFUSAL_PHRASES)


def n_words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (ties may count half: k need not be whole)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(outcomes: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss, or a prompt's average
    over its samples), resampling prompts with replacement."""
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return lo, hi


def win_tie_loss(outcomes: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Win / tie / loss counts of per-prompt outcomes, the win rate (ties half) and its paired-bootstrap 95%
    interval."""
    n = len(outcomes)
    wins = sum(1 for o in outcomes if o > 0.5)
    losses = sum(1 for o in outcomes if o < 0.5)
    rate = sum(outcomes) / n if n else float("nan")
    lo, hi = paired_bootstrap(outcomes, n_boot, seed)
    return {"win": wins, "tie": n - wins - losses, "loss": losses, "n": n, "win_rate": rate, "ci95": [lo, hi]}


def format_win_rate(result: dict) -> str:
    lo, hi = result["ci95"]
    return (f"{result['win_rate']:.1%} [95% CI {lo:.1%}, {hi:.1%}] (win {result['win']} / tie {result['tie']} / "
            f"loss {result['loss']}, n {result['n']})")


def _rule(a: float, b: float, prefer_smaller: bool) -> float:
    """1 if the rule picks the chosen answer, 0 if the rejected, 0.5 on a tie."""
    if a == b:
        return 0.5
    return float((a < b) == prefer_smaller)


def rule_outcomes(chosen: Sequence[str], rejected: Sequence[str]) -> dict[str, list[float]]:
    """Per pair, whether each rule agrees with the human label (1), disagrees (0) or cannot tell (0.5)."""
    out: dict[str, list[float]] = {"shorter": [], "longer": [], "refusal": []}
    for c, r in zip(chosen, rejected, strict=True):
        nc, nr = n_words(c), n_words(r)
        out["shorter"].append(_rule(nc, nr, prefer_smaller=True))
        out["longer"].append(_rule(nc, nr, prefer_smaller=False))
        rc, rr = is_refusal(c), is_refusal(r)
        out["refusal"].append(0.5 if rc == rr else float(rc))
    return out


def rule_accuracies(chosen: Sequence[str], rejected: Sequence[str]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in rule_outcomes(chosen, rejected).items()} if chosen else {}


def accuracy_report(correct: Sequence[float], chosen: Sequence[str], rejected: Sequence[str],
                    subsets: Sequence[str | None] | None = None, margin: float = CLEAR_MARGIN) -> dict:
    """A model's accuracy on labelled pairs (1 right, 0 wrong, 0.5 tie) beside the length and refusal rules,
    overall and per subset: `{"all": {...}, "<subset>": {...}}`, each with n, accuracy, ci95, the rules'
    accuracies, the best rule, the margin over it and `beats_rules` (margin >= `margin`)."""
    subsets = list(subsets) if subsets is not None else [None] * len(correct)
    groups: dict[str, list[int]] = {"all": list(range(len(correct)))}
    for i, s in enumerate(subsets):
        if s is not None:
            groups.setdefault(str(s), []).append(i)
    if len(groups) == 2:  # one subset: it is "all"
        groups = {"all": groups["all"]}
    report = {}
    for name, idx in groups.items():
        k, n = sum(correct[i] for i in idx), len(idx)
        rules = rule_accuracies([chosen[i] for i in idx], [rejected[i] for i in idx])
        best = max(rules, key=rules.get)
        accuracy = k / n
        report[name] = {"n": n, "accuracy": accuracy, "ci95": list(wilson_interval(k, n)), "rules": rules,
                        "best_rule": best, "margin_over_best_rule": accuracy - rules[best],
                        "beats_rules": accuracy - rules[best] >= margin}
    return report


def format_accuracy_report(report: dict, what: str = "accuracy") -> list[str]:
    lines = []
    for name, r in report.items():
        lo, hi = r["ci95"]
        rules = ", ".join(f"{k} {v:.3f}" for k, v in r["rules"].items())
        verdict = "" if r["beats_rules"] else f"  <- NOT {CLEAR_MARGIN:.0%} above the best rule ({r['best_rule']})"
        lines.append(f"{name:>26s}: {what} {r['accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}] n {r['n']}; rules: "
                     f"{rules}; margin {r['margin_over_best_rule']:+.3f}{verdict}")
    return lines
