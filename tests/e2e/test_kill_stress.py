"""Kill -9 at random moments (bench/kill_stress.py), resume with `--ckpt_path last`: the adapter equals the
uninterrupted run's. CI runs one trial for two stages (one offline, one online) beside a busy loop; the full run
(`python bench/kill_stress.py`, 50+ trials over all six stages) is in the README's figures."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
pytestmark = pytest.mark.slow


def test_random_kills_then_resume_give_the_uninterrupted_adapter(tmp_path):
    import kill_stress

    lines = []
    results = kill_stress.stress(["dpo", "grpo"], trials=1, work=tmp_path, seed=1, load=1, log=lines.append)
    assert len(results) == 2 and all(r["loaded"] for r in results), lines
    assert all(r["kills"] for r in results)
    assert any(k["landed"] for r in results for k in r["kills"]), lines  # at least one kill hit a live run
    assert all(r["equal"] for r in results), "\n".join(lines)
