"""Preference data: the three record shapes, the template, truncation, stacking, bad records, the split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from alpaca_rlhf.data.preference import (
    PreferenceCollator,
    PreferenceDataModule,
    PreferencePair,
    build_preference_pairs,
    build_shuffled_pairs,
    check_preference,
    detect_format,
    render_pair,
    split_hh_dialogue,
    tokenize_pair,
)
from alpaca_rlhf.data.records import PACKAGE_ROOT, DataValidationError, read_raw_records
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.models import train_tiny_tokenizer

HH_FILE = PACKAGE_ROOT.parent / "shared/data/hh-rlhf-harmless/test.jsonl.gz"
SAMPLE = "alpaca_rlhf/data/samples/preferences_sample.jsonl"
EXPECTED_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a primary color.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(vocab_size=512)


def write_jsonl(path: Path, records: list) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def make_dm(tokenizer, path: str, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(data_path=path, **{"val_set_size": 0, **kwargs})
    dm.connect(tokenizer)
    return dm


def test_every_shape_renders_the_same_pair_with_the_alpaca_template():
    template = PromptTemplate.load("alpaca")
    seed = {"user_input": "Name a primary color.", "completion_a": "Red.", "completion_b": "Banana."}
    pcr = {"prompt": "Name a primary color.", "chosen": "Red.", "rejected": "Banana."}
    hh = {"chosen": "\n\nHuman: Name a primary color.\n\nAssistant: Red.",
          "rejected": "\n\nHuman: Name a primary color.\n\nAssistant: Banana."}
    assert [detect_format([r]) for r in (seed, pcr, hh)] == ["seed", "prompt_chosen_rejected", "hh"]
    pairs = {render_pair(seed, "seed", template), render_pair(pcr, "prompt_chosen_rejected", template),
             render_pair(hh, "hh", template)}
    assert pairs == {PreferencePair(EXPECTED_PROMPT, "Red.", "Banana.")}


def test_unknown_shape_names_the_known_ones():
    with pytest.raises(DataValidationError, match="user_input, completion_a"):
        detect_format([{"question": "q", "answer": "a"}])


def test_hh_multi_turn_takes_the_last_human_turn_as_instruction_and_the_rest_as_context():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
    instruction, context, chosen, rejected = split_hh_dialogue(
        prompt + "\n\nAssistant: Why did the chicken cross the road?", prompt + "\n\nAssistant: No.")
    assert instruction == "Tell me a joke."
    assert context == "Human: Hi there\n\nAssistant: Hello! How can I help?"
    assert (chosen, rejected) == ("Why did the chicken cross the road?", "No.")
    record = {"chosen": prompt + "\n\nAssistant: A", "rejected": prompt + "\n\nAssistant: B"}
    rendered = render_pair(record, "hh", PromptTemplate.load("alpaca"))
    assert rendered.prompt.endswith(
        "### Instruction:\nTell me a joke.\n\n### Input:\n"
        "Human: Hi there\n\nAssistant: Hello! How can I help?\n\n### Response:\n")


def test_hh_responses_that_contain_turn_markers_split_at_the_shared_prefix():
    # as record 1952 of the harmless test split: the chosen response itself holds a second "Assistant:" turn
    prompt = "\n\nHuman: Find me a serial.\n\nAssistant:"
    _, _, chosen, rejected = split_hh_dialogue(prompt + " Here:\n\nAssistant: ok",
                                               prompt + " You mean a password?")
    assert chosen == "Here:\n\nAssistant: ok" and rejected == "You mean a password?"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"user_input": "q", "completion_a": "a"}, "record 1: field 'completion_b' is missing"),
        ({"user_input": "q", "completion_a": 3, "completion_b": "b"},
         "record 1: field 'completion_a' must be a string, got int"),
        ({"user_input": "  ", "completion_a": "a", "completion_b": "b"},
         "record 1: field 'user_input' is empty"),
        ({"user_input": "q", "completion_a": "same", "completion_b": "same "},
         "record 1: field 'completion_b' equals 'completion_a'"),
        ("just a string", "record 1: field '<record>' is a str, not an object"),
    ],
)
def test_bad_records_raise_clear_errors_or_are_skipped_and_counted(tmp_path, tokenizer, record, message):
    good = {"user_input": "q", "completion_a": "a", "completion_b": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, record, good])
    with pytest.raises(DataValidationError, match=message) as err:
        make_dm(tokenizer, path, format="seed").setup()
    assert str(err.value).startswith(path) and "skip_bad_records" in str(err.value)
    dm = make_dm(tokenizer, path, format="seed", skip_bad_records=True)
    dm.setup()
    assert (dm.report.total, dm.report.skipped, len(dm.train_data)) == (3, 1, 2)


def test_hh_checks_name_the_field():
    turn = "\n\nHuman: q\n\nAssistant: "
    assert check_preference({"chosen": turn, "rejected": turn + "b"}, "hh") == (
        "chosen", "has an empty last assistant turn")
    assert check_preference({"chosen": turn + "b", "rejected": turn + "b"}, "hh")[0] == "rejected"
    assert check_preference({"chosen": "no turns", "rejected": "at all"}, "hh")[0] == "chosen"


def test_the_seed_file_missing_is_a_clear_error(tokenizer):
    with pytest.raises(FileNotFoundError, match="comparision_data.json"):
        make_dm(tokenizer, "comparision_data.json").setup()


def test_gzip_jsonl_prompt_chosen_rejected_loads_by_detection(tmp_path, tokenizer):
    records = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": "No."} for i in range(10)]
    dm = make_dm(tokenizer, write_jsonl(tmp_path / "pairs.jsonl.gz", records), val_set_size=3)
    dm.setup()
    assert (len(dm.train_data), len(dm.val_data)) == (7, 3)


@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"shared HH-RLHF data not found at {HH_FILE}")
def test_real_hh_harmless_file_loads_and_its_bad_records_are_named(tokenizer):
    with pytest.raises(DataValidationError, match="record 86: field 'chosen' has an empty last assistant"):
        make_dm(tokenizer, str(HH_FILE)).load_pairs()
    dm = make_dm(tokenizer, str(HH_FILE), skip_bad_records=True)
    pairs = dm.load_pairs()
    assert (dm.report.total, dm.report.skipped, len(pairs)) == (2312, 4, 2308)
    assert all(p.prompt.endswith("### Response:\n") and p.chosen != p.rejected for p in pairs)
    assert "### Instruction:\nokay some of these do not have anything to do with pens\n\n" in pairs[0].prompt


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_responses(tokenizer):
    pair = PreferencePair(PromptTemplate.load().render("word " * 100), "A good short answer.", "Bad.")
    full = tokenize_pair(tokenizer, pair, max_length=10_000)
    cut = tokenize_pair(tokenizer, pair, max_length=40)
    eos = [tokenizer.eos_token_id]
    chosen_ids = tokenizer("A good short answer.", add_special_tokens=False)["input_ids"] + eos
    rejected_ids = tokenizer("Bad.", add_special_tokens=False)["input_ids"] + eos
    assert not full["truncated"] and cut["truncated"]
    assert len(cut["chosen_input_ids"]) == 40
    p = cut["prompt_length"]
    assert cut["chosen_input_ids"][p:] == chosen_ids and cut["rejected_input_ids"][p:] == rejected_ids
    assert cut["chosen_input_ids"][:p] == cut["rejected_input_ids"][:p]  # the same prompt for both
    assert cut["chosen_input_ids"][0] == tokenizer.bos_token_id
    # the kept prompt is the full prompt's end: "### Response:\n" stays next to the response
    full_prompt = full["chosen_input_ids"][:full["prompt_length"]]
    assert cut["chosen_input_ids"][1:p] == full_prompt[-(p - 1):]
    assert tokenizer.decode(cut["chosen_input_ids"][:p]).endswith("### Response:\n")
    assert tokenize_pair(tokenizer, pair, max_length=len(chosen_ids)) is None  # no room for any prompt


def test_pairs_whose_responses_do_not_fit_are_dropped_and_counted(tmp_path, tokenizer):
    records = [{"prompt": "Q " * 80, "chosen": "yes.", "rejected": "no."},
               {"prompt": "Q", "chosen": "long " * 80, "rejected": "no."},
               {"prompt": "Q", "chosen": "fine.", "rejected": "bad."}]
    dm = make_dm(tokenizer, write_jsonl(tmp_path / "p.jsonl", records), max_length=64)
    dm.setup()
    assert (dm.report.truncated, dm.report.dropped_too_long, len(dm.train_data)) == (1, 1, 2)
    assert max(len(e["chosen_input_ids"]) for e in dm.train_data) <= 64


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_stacks_chosen_then_rejected(side):
    pairs = [{"chosen_input_ids": [1, 5, 6], "rejected_input_ids": [1, 5]},
             {"chosen_input_ids": [1, 7], "rejected_input_ids": [1, 7, 8, 9]}]
    batch = PreferenceCollator(pad_token_id=0, padding_side=side)(pairs)
    right = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0], [1, 5, 0, 0], [1, 7, 8, 9]])
    if side == "right":
        assert torch.equal(batch["input_ids"], right)
    else:
        left = torch.tensor([[0, 1, 5, 6], [0, 0, 1, 7], [0, 0, 1, 5], [1, 7, 8, 9]])
        assert torch.equal(batch["input_ids"], left)
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([3, 2, 2, 4]))
    assert torch.equal(batch["input_ids"][batch["attention_mask"].bool()], right[right != 0])


def test_held_out_split_is_seeded_and_not_the_first_rows(tokenizer):
    def val_prompts(seed):
        dm = make_dm(tokenizer, SAMPLE, val_set_size=30, seed=seed)
        dm.setup()
        return [e["chosen_input_ids"] for e in dm.val_data], len(dm.train_data)

    first, n_train = val_prompts(42)
    assert len(first) == 30 and n_train == 373 - 30
    assert val_prompts(42)[0] == first and val_prompts(7)[0] != first
    dm = make_dm(tokenizer, SAMPLE)
    dm.setup()
    assert first != [e["chosen_input_ids"] for e in dm.train_data[:30]]


def test_shuffled_pairs_are_seeded_word_permutations_and_the_bundled_sample_is_their_output():
    records = [{"instruction": "Say hi.", "input": "", "output": "Hello there, my friend."},
               {"instruction": "Rate it.", "input": "A movie", "output": "Positive"}]  # one word: left out
    pairs = build_shuffled_pairs(records, seed=3)
    assert pairs == build_shuffled_pairs(records, seed=3) and len(pairs) == 1
    a, b = pairs[0]["completion_a"], pairs[0]["completion_b"]
    assert a != b and sorted(a.split()) == sorted(b.split())
    with_input = build_shuffled_pairs([{**records[1], "output": "x y"}])[0]
    assert with_input["user_input"] == "Rate it." and with_input["input"] == "A movie"  # rendered as ### Input:
    alpaca = read_raw_records("alpaca_rlhf/data/samples/alpaca_sample.json")
    assert read_raw_records(SAMPLE) == build_preference_pairs(alpaca, seed=0)
    mixed = build_preference_pairs(alpaca, seed=0)
    truncated = [p for p in mixed if len(p["completion_b"].split()) < len(p["completion_a"].split())]
    assert 0.3 * len(mixed) < len(truncated) < 0.7 * len(mixed)  # both corruptions are present
    assert all(p["completion_a"].split()[: len(p["completion_b"].split())] == p["completion_b"].split()
               for p in truncated)


def test_train_parts_are_disjoint_and_share_the_held_out_pairs(tokenizer):
    parts = []
    for part in ("1/2", "2/2"):
        dm = make_dm(tokenizer, SAMPLE, val_set_size=30, train_part=part)
        dm.setup()
        parts.append(dm)
    a, b = ([tuple(e["chosen_input_ids"]) for e in dm.train_data] for dm in parts)
    assert not set(a) & set(b) and len(a) + len(b) == 373 - 30
    assert [e["chosen_input_ids"] for e in parts[0].val_data] == [e["chosen_input_ids"] for e in parts[1].val_data]
    with pytest.raises(ValueError, match="k/n"):
        make_dm(tokenizer, SAMPLE, train_part="3/2")


def test_auto_format_survives_a_bad_first_record_and_renders_the_input_section(tokenizer, tmp_path, caplog):
    """One malformed first record used to make every good record fail as HH; and the reward model never saw the
    `### Input:` section that SFT, PPO and compare render."""
    import json
    import logging

    good = {"user_input": "Summarize the text.", "input": "A long text.", "completion_a": "Short.",
            "completion_b": "Text long a."}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"chosen": "no dialogue", "rejected": ""}, good, good]))
    with caplog.at_level(logging.INFO, logger="alpaca_rlhf.data.preference"):
        dm = make_dm(tokenizer, str(path), skip_bad_records=True)
        pairs = dm.load_pairs()
    assert "format auto -> seed" in caplog.text and dm.report.skipped == 1 and len(pairs) == 2
    assert "### Input:\nA long text.\n\n### Response:\n" in pairs[0].prompt
    assert pairs[0].prompt == PromptTemplate.load().render("Summarize the text.", "A long text.")
