"""bench/blind_read.py, the blind pairwise read: the sheet never shows which answer is which, the coin puts each
side behind A about half the time, and the score turns the reader's A/B verdicts back into the candidate's (or the
human label's) side, so a reader who always picks one model scores 100% however the letters fall."""

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _outputs(path, n=40):
    rows = []
    for i in range(n):
        rows.append({"prompt_id": i, "sample": 0, "stage": "sft", "instruction": f"question {i}", "input": "",
                     "response": f"plain answer {i}"})
        rows.append({"prompt_id": i, "sample": 0, "stage": "rlhf", "instruction": f"question {i}", "input": "",
                     "response": f"GOOD answer {i}"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_the_sheet_hides_the_sides_and_the_score_recovers_them(tmp_path):
    import blind_read

    items = blind_read.compare_items(_outputs(tmp_path / "outputs.jsonl"), "sft", "rlhf")
    blind_read.write_sheet(items, "t", "baseline", "candidate", seed=7, note="test", folder=tmp_path)
    sheet = (tmp_path / "t.sheet.md").read_text()
    assert "sft" not in sheet and "rlhf" not in sheet and "candidate" not in sheet  # nothing names a side
    key = json.loads((tmp_path / "t.key.json").read_text())
    shown_first = sum(1 for it in key["items"] if it["A"] == "candidate")
    assert 10 <= shown_first <= 30  # the coin, not the order of the file, decides the letter
    # a reader who always picks the answer that says GOOD: read the letters off the sheet as a person would
    verdicts = []
    for block in sheet.split("\n## ")[1:]:
        number = int(block.split("\n", 1)[0])
        a_text = block.split("**A**", 1)[1].split("**B**", 1)[0]
        verdicts.append(f"{number} {'A' if 'GOOD' in a_text else 'B'}")
    (tmp_path / "t.verdicts.txt").write_text("\n".join(verdicts))
    result = blind_read.score(["t"], tmp_path)
    assert (result["win"], result["loss"], result["tie"]) == (40, 0, 0)
    assert result["win_rate"] == 1.0
    assert blind_read.summary_lines(tmp_path) == ["- t: 100.0% [95% CI 100.0%, 100.0%] (win 40 / tie 0 / loss 0, n 40)"]
    # a second sheet of the same prompts (another sampling seed) is paired with the first by prompt, not counted
    # as 40 more prompts: the interval is over prompts
    blind_read.write_sheet(items, "t2", "baseline", "candidate", seed=8, note="test", folder=tmp_path)
    (tmp_path / "t2.verdicts.txt").write_text("\n".join(f"{i} tie" for i in range(1, 41)))
    both = blind_read.score(["t", "t2"], tmp_path)
    assert both["n"] == 40 and both["win_rate"] == 0.75 and both["win"] == 40
    # and one who always answers "A" is at chance, whatever the coin did
    (tmp_path / "t.verdicts.txt").write_text("\n".join(f"{i} A" for i in range(1, 41)))
    assert blind_read.score(["t"], tmp_path)["win"] == shown_first


def test_the_summary_pools_the_reads_of_one_model(tmp_path):
    import blind_read

    items = blind_read.compare_items(_outputs(tmp_path / "outputs.jsonl"), "sft", "rlhf")
    for name, seed, verdict in (("m_seed1", 7, "tie"), ("m_trainseed2_seed3", 8, None), ("other", 9, "tie")):
        blind_read.write_sheet(items, name, "baseline", "candidate", seed=seed, note="test", folder=tmp_path)
        key = json.loads((tmp_path / f"{name}.key.json").read_text())
        # ties, or always the candidate: read the letter off the key, as only a test may
        lines = [f"{it['id']} {verdict or ('A' if it['A'] == 'candidate' else 'B')}" for it in key["items"]]
        (tmp_path / f"{name}.verdicts.txt").write_text("\n".join(lines))
    assert blind_read.model_of("ppo_lam1_trainseed7_seed79") == "ppo_lam1" and blind_read.model_of("ppo") == "ppo"
    lines = blind_read.summary_lines(tmp_path)
    assert lines[-1] == "- m, 2 reads paired by prompt: 75.0% [95% CI 75.0%, 75.0%] (win 40 / tie 0 / loss 0, n 40)"
    assert not any(line.startswith("- other,") for line in lines)  # one read: nothing to pool


def test_a_missing_or_malformed_verdict_names_the_file_and_line(tmp_path):
    import blind_read

    items = blind_read.compare_items(_outputs(tmp_path / "outputs.jsonl", n=3), "sft", "rlhf")
    blind_read.write_sheet(items, "t", "baseline", "candidate", seed=7, note="test", folder=tmp_path)
    (tmp_path / "t.verdicts.txt").write_text("1 A\n2 maybe\n3 B\n")
    with pytest.raises(SystemExit, match=r"t.verdicts.txt: line 2: expected '<id> A\|B\|tie'"):
        blind_read.score(["t"], tmp_path)
    (tmp_path / "t.verdicts.txt").write_text("1 A\n3 tie\n")
    with pytest.raises(SystemExit, match=r"no verdict for item\(s\) \[2\]"):
        blind_read.score(["t"], tmp_path)
