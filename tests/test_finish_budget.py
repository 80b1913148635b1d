"""bench/finish_budget.py: the share of answers that end within each budget, and the RM's score of finished
answers by length beside the answers cut at the budget, read from compare's outputs.jsonl."""

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _row(stage, tokens, ended, score):
    return {"stage": stage, "response_tokens": tokens, "ended_with_eos": ended, "score": score}


def test_finish_rates_and_the_cut_answers_score(tmp_path, capsys):
    import finish_budget

    rows = ([_row("sft", 20, True, 1.0)] * 3 + [_row("sft", 100, True, 2.0)] * 3
            + [_row("sft", 128, False, -1.0)] * 4 + [_row("rlhf", 5, True, 9.0)] * 5)
    path = tmp_path / "outputs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sft = finish_budget.read_rows([path], "sft")
    assert len(sft) == 10 and finish_budget.generated_budget(sft) == 128
    # budgets above the one the answers were generated with are not reported (nothing is known there)
    assert finish_budget.finish_rates(sft) == [(32, 0.3), (64, 0.3), (96, 0.3), (128, 0.6)]
    assert finish_budget.score_by_length(sft) == [("finished, 1-32 tokens", 3, 1.0),
                                                  ("finished, 97-128 tokens", 3, 2.0),
                                                  ("cut at 128 tokens", 4, -1.0)]
    finish_budget.main([str(path), "--stage", "rlhf"])
    out = capsys.readouterr().out
    assert "| 32 | 100% |" in out and "| finished, 1-32 tokens | 5 | 9.000 |" in out and "cut at" not in out


def test_a_file_that_is_not_compares_outputs_names_the_line(tmp_path):
    import finish_budget

    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps(_row("sft", 3, True, 0.0)) + "\n" + json.dumps({"stage": "sft"}) + "\n")
    with pytest.raises(ValueError, match=r"outputs.jsonl:2: .*response_tokens"):
        finish_budget.read_rows([path], "sft")
    path.write_text(json.dumps(_row("sft", 3, True, 0.0)) + "\n")
    with pytest.raises(ValueError, match="no rows of stage 'rlhf'"):
        finish_budget.read_rows([path], "rlhf")
    # files made with different budgets cannot be pooled: "ends within 128" is unknown for an answer cut at 96
    path.write_text(json.dumps(_row("sft", 96, False, 0.0)) + "\n" + json.dumps(_row("sft", 128, False, 0.0)) + "\n")
    with pytest.raises(ValueError, match=r"cut at \[96, 128\] tokens"):
        finish_budget.read_rows([path], "sft")
