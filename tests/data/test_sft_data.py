import gzip
import json

import pytest
import torch

from alpaca_rlhf.data import AlpacaDataModule, DataValidationError
from alpaca_rlhf.data.records import read_raw_records
from alpaca_rlhf.data.sampling import SeededSampler
from alpaca_rlhf.data.sft import IGNORE_INDEX, SFTCollator, seeded_split, tokenize_example

SAMPLE = "alpaca_rlhf/data/samples/alpaca_sample.json"


def _dm(path, tokenizer, **kw):
    dm = AlpacaDataModule(data_path=str(path), val_set_size=kw.pop("val_set_size", 0), **kw)
    dm.connect(tokenizer)
    return dm


def test_labels_mask_prompt_and_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = tokenize_example(tok, "### Instruction:\nSay hi\n\n### Response:\n", "Hi there.", cutoff_len=256)
    n_prompt = len(tok("### Instruction:\nSay hi\n\n### Response:\n")["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"][0] == tok.bos_token_id
    short = tokenize_example(tok, "P:\n", "x", cutoff_len=256)
    batch = SFTCollator(tok.pad_token_id)([ex, short])
    n = len(short["input_ids"])
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["input_ids"][1, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"][1].sum() == n and batch["attention_mask"][0].sum() == len(ex["input_ids"])


def test_train_on_inputs_and_no_eos(tiny_tokenizer):
    ex = tokenize_example(tiny_tokenizer, "Prompt:\n", "Answer", 256, train_on_inputs=True, add_eos_token=False)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] != tiny_tokenizer.eos_token_id


def test_truncation_is_counted(tiny_tokenizer):
    dm = _dm(SAMPLE, tiny_tokenizer, cutoff_len=80, max_records=50)
    dm.setup("fit")
    assert 0 < dm.report.truncated < 50 and dm.report.dropped_too_long <= dm.report.truncated
    assert all(len(e["input_ids"]) <= 80 for e in dm.train_data)
    assert len(dm.train_data) == 50 - dm.report.dropped_too_long


def test_seeded_split_is_random_and_reproducible():
    train, val = seeded_split(100, 10, seed=1)
    assert len(val) == 10 and set(train).isdisjoint(val) and val != list(range(10))
    assert seeded_split(100, 10, seed=1) == (train, val) and seeded_split(100, 10, seed=2)[1] != val
    assert len(seeded_split(100, 0.2, seed=1)[1]) == 20


def test_sampler_order_depends_on_epoch_and_skip_resumes():
    s = SeededSampler(20, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == list(range(20)) and first != second
    s.set_epoch(0)
    s.skip(0, 8)
    assert list(s) == first[8:] and list(s) == first  # the skip applies once


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}],
         "record 1: field 'output' is missing"),
        ([{"instruction": "a", "input": 3, "output": "b"}], "record 0: field 'input' must be a string, got int"),
        ([{"instruction": "a", "input": "", "output": "  "}], "record 0: field 'output' is empty"),
        ([{"instruction": None, "input": "", "output": "x"}], "record 0: field 'instruction' is missing"),
        (["just a string"], "record 0: field '<record>'"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, tiny_tokenizer, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataValidationError, match=message) as err:
        _dm(path, tiny_tokenizer).setup("fit")
    assert str(path) in str(err.value)


def test_not_json_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(DataValidationError, match=r"broken.json: not JSON"):
        _dm(path, tiny_tokenizer).setup("fit")
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataValidationError, match=r"broken.jsonl: line 2 is not JSON"):
        read_raw_records(str(lines))


def test_skip_bad_records_counts_them(tmp_path, tiny_tokenizer):
    good = {"instruction": "Say hi", "input": "", "output": "Hi"}
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in [good, {"instruction": "x"}, good, {"instruction": "y", "output": 5}, good]:
            f.write(json.dumps(r) + "\n")
    dm = _dm(path, tiny_tokenizer, skip_bad_records=True)
    dm.setup("fit")
    assert dm.report.skipped == 2 and len(dm.train_data) == 3
    assert "record 1: field 'output' is missing" in dm.report.reasons[0]


def test_missing_file_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        _dm("nope.json", tiny_tokenizer).setup("fit")


def test_bundled_sample_is_valid_alpaca(tiny_tokenizer):
    dm = _dm(SAMPLE, tiny_tokenizer, val_set_size=40)
    dm.setup("fit")
    assert dm.report.total == 400 and dm.report.skipped == 0
    assert len(dm.train_data) + len(dm.val_data) + dm.report.dropped_too_long == 400 and len(dm.val_data) == 40
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].dtype == torch.long
