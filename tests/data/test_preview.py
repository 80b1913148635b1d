"""`alpaca-rlhf data`: the counts and the examples a stage's DataModule will feed the model, before training."""

from __future__ import annotations

import pytest

from alpaca_rlhf.cli import main

TINY_BASE = ["--model.init_args.model.name_or_path", "output/tiny/base", "--model.init_args.model.tiny", "{}"]


def test_sft_preview_shows_the_counts_and_brackets_exactly_the_unlabelled_prompt(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["data", "-c", "tiny/sft", "--show", "2"])
    out = capsys.readouterr().out
    assert "400 records, 0 skipped as bad" in out and "360 train / 40 val examples; batch size 8" in out
    examples = out.split("--- train example ")[1:]
    assert len(examples) == 2
    for example in examples:
        header, text = example.split("\n", 1)
        tokens, labelled = (int(w) for w in header.split(":", 1)[1].replace(",", "").split()[0:3:2])
        assert 0 < labelled < tokens  # the response carries the loss, the prompt does not
        assert text.startswith("[<s>Below is an instruction") and "### Response:\n]" in text  # prompt bracketed
        assert text.rstrip().endswith("</s>")  # the response ends with EOS, which is labelled
    assert not (tmp_path / "output" / "tiny" / "checkpoints").exists()  # nothing trained


def test_preference_and_prompt_previews_and_their_mistakes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["data", "-c", "tiny/rm", "--show", "1", "--split", "val", *TINY_BASE])
    out = capsys.readouterr().out
    assert "--- val example 1: prompt" in out and "\nchosen:   " in out and "\nrejected: " in out
    main(["data", "-c", "tiny/ppo", "--show", "1", "--model.init_args.policy.name_or_path", "output/tiny/base"])
    assert "(the policy writes the response)" in capsys.readouterr().out
    for args, says in ((["--show", "x"], "--show takes a number"), (["--split", "test"], "--split is train or val"),
                       (["--data.init_args.cutof_len", "3"], "did you mean --data.init_args.cutoff_len")):
        with pytest.raises(SystemExit):
            main(["data", "-c", "tiny/sft", *args])
        assert says in capsys.readouterr().err
