"""Evidence: intervals, the length and refusal rules, the RM's held-out report, and the pairwise LLM judge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alpaca_rlhf.evaluation import (
    accuracy_report,
    is_refusal,
    paired_bootstrap,
    rule_outcomes,
    wilson_interval,
    win_tie_loss,
)
from alpaca_rlhf.inference.judge import JudgedPair, PairwiseJudge, outcomes_from_log_odds

QWEN = Path(os.environ.get("ALPACA_RLHF_CACHE", Path.home() / ".cache/alpaca_rlhf"),
            "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson_interval(81, 100)  # a standard worked example: 0.81 of 100 -> [0.722, 0.874]
    assert lo == pytest.approx(0.7222, abs=1e-3) and hi == pytest.approx(0.8744, abs=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.29  # never a zero-width interval at 0
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] > wilson_interval(500, 1000)[1] \
        - wilson_interval(500, 1000)[0]


def test_paired_bootstrap_covers_the_mean_and_narrows_with_n():
    small = [1.0, 0.0, 0.5, 1.0] * 8
    lo, hi = paired_bootstrap(small)
    assert lo < sum(small) / len(small) < hi
    lo2, hi2 = paired_bootstrap(small * 10)
    assert hi2 - lo2 < (hi - lo) / 2
    assert paired_bootstrap(small, seed=3) == paired_bootstrap(small, seed=3)  # seeded
    result = win_tie_loss([1, 1, 1, 0.5, 0])
    assert (result["win"], result["tie"], result["loss"], result["n"]) == (3, 1, 1, 5)
    assert result["win_rate"] == pytest.approx(0.7)


def test_the_rules_score_length_and_refusals_per_pair():
    chosen = ["short", "a much longer answer here", "I'm sorry, I can't help with that.", "same same"]
    rejected = ["a much longer answer", "short", "Sure, here is how.", "diff diff"]
    rules = rule_outcomes(chosen, rejected)
    assert rules["shorter"] == [1.0, 0.0, 0.0, 0.5]
    assert rules["longer"] == [0.0, 1.0, 1.0, 0.5]
    assert rules["refusal"] == [0.5, 0.5, 1.0, 0.5]
    assert is_refusal("I’m sorry, but no") and not is_refusal("It is illegal to do that, but here is the law.")


def test_a_model_no_better_than_a_length_rule_is_flagged_per_subset():
    chosen = ["ok"] * 50 + ["a long and useful answer"] * 50
    rejected = ["a long and useless answer"] * 50 + ["no"] * 50
    subsets = ["harmless"] * 50 + ["helpful"] * 50
    # right on every pair: beats every rule (each rule is right on one subset only)
    report = accuracy_report([1.0] * 100, chosen, rejected, subsets)
    assert report["all"]["beats_rules"] and report["all"]["accuracy"] == 1.0
    assert report["harmless"]["best_rule"] == "shorter" and report["helpful"]["best_rule"] == "longer"
    # "always the shorter": 0.5 overall, but exactly the rule on the harmless subset and the anti-rule on helpful
    shorter = [1.0] * 50 + [0.0] * 50
    report = accuracy_report(shorter, chosen, rejected, subsets)
    assert not report["harmless"]["beats_rules"] and not report["all"]["beats_rules"]
    assert report["all"]["ci95"][0] < 0.5 < report["all"]["ci95"][1]


def test_both_orders_rule_ties_where_the_orders_disagree_and_debiased_sums_them():
    forward, backward = [2.0, 2.0, -1.0, 0.3], [-1.0, 1.0, 1.0, 0.5]
    assert outcomes_from_log_odds(forward, backward) == [1.0, 0.5, 0.0, 0.5]
    assert outcomes_from_log_odds(forward, backward, "debiased") == [1.0, 1.0, 0.0, 0.0]


def test_the_judge_reads_a_real_model_and_ties_identical_answers(tiny_base):
    judge = PairwiseJudge(str(tiny_base), batch_size=2)
    pairs = [JudgedPair("User: name a colour", "Red.", "Red."), JudgedPair("User: hi", "Hello!", "")]
    forward, backward = judge.both_orders(pairs)
    assert forward[0] == pytest.approx(backward[0], abs=1e-5)  # the same text in both slots
    assert judge.outcomes(pairs)[0] == 0.5  # so no order can make it win
    assert "(empty reply)" in judge.render(pairs[1]) and "Hello!" in judge.render(pairs[1])


@pytest.mark.skipif(not QWEN.is_file(), reason=f"the judge model is not fetched ({QWEN}); run "
                    "../shared/tools/get-judge-model.sh")
@pytest.mark.slow
def test_the_qwen_judge_prefers_an_answer_to_an_off_topic_one():
    judge = PairwiseJudge(str(QWEN), batch_size=2)
    pairs = [JudgedPair("User: What is the capital of France?", "The capital of France is Paris.",
                        "I like turtles and the colour green."),
             JudgedPair("User: How many legs does a spider have?", "A spider has eight legs.",
                        "Bananas are yellow.")]
    assert judge.outcomes(pairs, "debiased") == [1.0, 1.0]
