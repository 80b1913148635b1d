"""One split for every stage: disjoint parts by normalized prompt, on the real HH files (helpful + harmless)."""

from __future__ import annotations

import pytest

from alpaca_rlhf.data.partition import PARTS, Partition, normalize, part_counts, prompt_key, take_part
from alpaca_rlhf.data.preference import PreferenceDataModule, check_preference
from alpaca_rlhf.data.prompts import PromptDataModule
from alpaca_rlhf.data.records import PACKAGE_ROOT, SUBSET_KEY, read_raw_records, validate_records
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.models import train_tiny_tokenizer

SHARED = PACKAGE_ROOT.parent / "shared/data"
HH = [str(SHARED / "hh-rlhf-harmless"), str(SHARED / "hh-rlhf-helpful")]
SUBSETS = {"harmless", "helpful-base", "helpful-online", "helpful-rejection-sampled"}
needs_hh = pytest.mark.skipif(not (SHARED / "hh-rlhf-helpful").is_dir() or not (SHARED / "hh-rlhf-harmless").is_dir(),
                              reason="the HH helpful and harmless test splits are not in ../shared/data")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(vocab_size=512)


@pytest.fixture(scope="module")
def hh_records():
    raw = read_raw_records(HH)
    records, _ = validate_records(raw, "hh", lambda r: check_preference(r, "hh"), skip_bad=True)
    return records


def test_the_key_is_the_normalized_first_user_turn_of_every_shape():
    hh = {"chosen": "\n\nHuman: What's  up?\n\nAssistant: Hi.\n\nHuman: more\n\nAssistant: ok", "rejected": "x"}
    assert prompt_key(hh) == "what s up"
    assert prompt_key({"instruction": "What's up?", "output": "o"}) == "what s up"
    assert prompt_key({"messages": [{"role": "system", "content": "be nice"},
                                    {"role": "user", "content": "WHAT'S UP"}]}) == "what s up"
    assert normalize("  A\tb--C ") == "a b c"


def test_parts_follow_the_fractions_and_the_seed():
    keys = [f"prompt number {i}" for i in range(20000)]
    split = Partition(rm=0.5, judge=0.0, rl=0.2, dpo=0.1, heldout=0.1, eval=0.1, seed=1)
    counts = {p: 0 for p in PARTS}
    for k in keys:
        counts[split.part_of(k)] += 1
    assert counts["judge"] == 0
    for part, fraction in split.fractions().items():
        assert abs(counts[part] / len(keys) - fraction) < 0.015, (part, counts)
    other = Partition(rm=0.5, judge=0.0, rl=0.2, dpo=0.1, heldout=0.1, eval=0.1, seed=2)
    assert sum(split.part_of(k) != other.part_of(k) for k in keys) > 5000  # another seed, another split
    assert Partition(rm=0.5, rl=0.0, dpo=0.0, heldout=0.0, eval=0.0).part_of("x") in ("rm", None)
    with pytest.raises(ConfigError, match="sum to at most 1"):
        Partition(rm=0.9, rl=0.5)


@needs_hh
def test_the_real_helpful_and_harmless_files_load_as_four_subsets(hh_records):
    assert len(hh_records) > 8400
    assert {r[SUBSET_KEY] for r in hh_records} == SUBSETS


@needs_hh
def test_no_evaluation_or_held_out_prompt_is_in_any_training_part_on_the_real_hh_files(hh_records):
    split = Partition()
    parts = {p: take_part(hh_records, split, p) for p in PARTS}
    assert sum(len(v) for v in parts.values()) == len(hh_records)  # fractions sum to 1: every record has a part
    keys = {p: {prompt_key(r) for r in v} for p, v in parts.items()}
    for evaluated in ("eval", "heldout"):
        for trained in ("rm", "judge", "rl", "dpo"):
            assert not keys[evaluated] & keys[trained], (evaluated, trained)
    assert not keys["eval"] & keys["heldout"]
    # the full prompts (every turn) are disjoint too, and the repeats HH has stay inside one part
    full = {p: {normalize(r["chosen"].rsplit("\n\nAssistant:", 1)[0]) for r in v} for p, v in parts.items()}
    assert not full["eval"] & (full["rm"] | full["rl"] | full["dpo"] | full["judge"])
    repeated = len(hh_records) - len({prompt_key(r) for r in hh_records})
    assert repeated > 300  # what made the old per-stage hold-outs leak
    for part in ("eval", "heldout", "rl"):  # each subset is represented in each part
        assert {r[SUBSET_KEY] for r in parts[part]} == SUBSETS
    counts = part_counts(hh_records, split)
    assert counts["eval"] > 600 and counts["heldout"] > 600


@needs_hh
def test_every_stage_takes_its_part_from_the_same_split(tokenizer, hh_records):
    split = Partition(seed=7)
    rm = PreferenceDataModule(data_path=HH, format="hh", max_length=256, val_set_size=50, batch_size=2,
                              skip_bad_records=True, part="rm", partition=split, max_records=1200)
    rm.connect(tokenizer)
    rm.setup()
    rl = PromptDataModule(data_path=HH, max_prompt_length=256, val_set_size=40, batch_size=2, skip_bad_records=True,
                          part="rl", partition=split, max_records=1200)
    rl.connect(tokenizer)
    rl.setup()
    heldout = {prompt_key(r) for r in take_part(hh_records[:1200], split, "heldout")}
    assert rm.train_data and rl.train_data
    assert len(rm.val_data) == 50 and len(rl.val_data) == 40
    # the RM's held-out pairs and RL's validation prompts are the heldout part; neither trains on it
    rl_train = {prompt_key(e["record"]) for e in rl.train_data}
    rl_val = {prompt_key(e["record"]) for e in rl.val_data}
    assert rl_val <= heldout and not rl_train & heldout
    assert all(ex["chosen"] and ex["rejected"] and ex["subset"] in SUBSETS for ex in rm.train_data + rm.val_data)
    rm_train_texts = {ex["chosen"] for ex in rm.train_data}
    assert not rm_train_texts & {ex["chosen"] for ex in rm.val_data}


@needs_hh
def test_compare_evaluates_on_the_eval_part_drawn_across_subsets(tokenizer):
    from alpaca_rlhf.inference.comparison import PromptSource, held_out_records

    split = Partition()
    source = PromptSource(data_path=HH, part="eval", partition=split, max_prompts=64, max_prompt_length=256,
                          skip_bad_records=True)
    records = held_out_records(source, tokenizer, PromptTemplate.load("alpaca"))
    assert len(records) == 64
    assert len({r["subset"] for r in records}) >= 3  # drawn with the seed, not the file's first rows (harmless)
    raw = read_raw_records(HH)
    eval_keys = {prompt_key(r) for r in raw if split.part_of(prompt_key(r)) == "eval"}
    assert {r["prompt_key"] for r in records} <= eval_keys
