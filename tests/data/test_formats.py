"""Data in any common form, through `datasets`: Parquet, CSV, Arrow, JSON/JSONL(.gz), folders, save_to_disk
folders, a hub name's config/split/revision, and a field map, with errors that still name file, record, field."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from alpaca_rlhf.data import AlpacaDataModule, DataValidationError, PreferenceDataModule
from alpaca_rlhf.data.records import read_raw_records

SAMPLE = "alpaca_rlhf/data/samples/alpaca_sample.json"


@pytest.fixture(scope="module")
def records():
    rows = json.loads(open(SAMPLE).read())[:12]
    return [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]


def write_all_forms(records, folder):
    ds = datasets.Dataset.from_list(records)
    paths = {"parquet": folder / "d.parquet", "csv": folder / "d.csv", "jsonl.gz": folder / "d.jsonl.gz",
             "json": folder / "d.json"}
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    with gzip.open(paths["jsonl.gz"], "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    paths["json"].write_text(json.dumps(records))
    ds.save_to_disk(str(folder / "saved"))
    paths["saved"] = folder / "saved"
    paths["arrow"] = next((folder / "saved").glob("*.arrow"))
    return paths


def test_every_local_form_gives_the_same_records_and_the_same_examples(records, tmp_path, tiny_tokenizer):
    paths = write_all_forms(records, tmp_path)
    expected = None
    for form, path in paths.items():
        got = [{k: (r[k] or "") for k in ("instruction", "input", "output")} for r in read_raw_records(str(path))]
        assert got == records, form  # CSV reads an empty input as None: the validators accept both
        dm = AlpacaDataModule(data_path=str(path), val_set_size=0, batch_size=2)
        dm.connect(tiny_tokenizer)
        dm.setup()
        ids = [e["input_ids"] for e in dm.train_data]
        expected = expected or ids
        assert ids == expected, form


def test_a_folder_reads_its_files_in_name_order_and_errors_name_the_file_and_its_own_record(records, tmp_path,
                                                                                             tiny_tokenizer):
    folder = tmp_path / "parts"
    folder.mkdir()
    datasets.Dataset.from_list(records[:5]).to_parquet(str(folder / "a.parquet"))
    bad = [dict(r) for r in records[5:]]
    bad[2]["output"] = ""
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (folder / "notes.txt").write_text("ignored")
    assert len(read_raw_records(str(folder))) == len(records)
    dm = AlpacaDataModule(data_path=str(folder), val_set_size=0)
    dm.connect(tiny_tokenizer)
    with pytest.raises(DataValidationError, match=r"b\.jsonl: record 2: field 'output' is empty"):
        dm.setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataValidationError, match="is a folder with no data file"):
        read_raw_records(str(empty))


def test_field_map_renames_columns_for_sft_and_preference_data(records, tmp_path, tiny_tokenizer):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in records]
    datasets.Dataset.from_list(renamed).to_csv(str(tmp_path / "qa.csv"), index=False)
    dm = AlpacaDataModule(data_path=str(tmp_path / "qa.csv"), val_set_size=0,
                          fields={"instruction": "question", "input": "context", "output": "answer"})
    dm.connect(tiny_tokenizer)
    dm.setup()
    assert len(dm.train_data) == len(records)
    without_map = AlpacaDataModule(data_path=str(tmp_path / "qa.csv"), val_set_size=0)
    without_map.connect(tiny_tokenizer)
    with pytest.raises(DataValidationError, match=r"qa\.csv: record 0: field 'instruction' is missing"):
        without_map.setup()

    pairs = [{"q": r["instruction"], "good": r["output"], "bad": r["output"][::-1]} for r in records]
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    pm = PreferenceDataModule(data_path=str(tmp_path / "pairs.parquet"), format="prompt_chosen_rejected",
                              val_set_size=0, fields={"prompt": "q", "chosen": "good", "rejected": "bad"})
    pm.connect(tiny_tokenizer)
    pm.setup()
    assert len(pm.train_data) == len(records)


def test_a_hub_name_passes_config_split_and_revision_to_datasets(monkeypatch, records):
    """No network here: `datasets.load_dataset` is replaced only to see what it is asked for."""
    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return records

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = read_raw_records("org/set", split="test", hub_config="en", revision="v1.0",
                           fields={"instruction": "instruction"})
    assert calls == [("org/set", "en", "test", "v1.0")] and len(got) == len(records)


def test_a_broken_parquet_file_is_named(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataValidationError, match=r"broken\.parquet: cannot be read as parquet"):
        read_raw_records(str(tmp_path / "broken.parquet"))


def test_valid_alpaca_files_that_were_refused_now_load(tmp_path, tiny_tokenizer):
    """A CSV column that looks numeric is still text, a UTF-8 byte-order mark is skipped, and JSON Lines saved
    as .json reads as JSON Lines: each was refused before ('input' must be a string, got float; not JSON)."""
    rows = [{"instruction": "Add the numbers.", "input": "12", "output": "3"},
            {"instruction": "Round it.", "input": "2.5", "output": "3"},
            {"instruction": "Say hi.", "input": "", "output": "Hi."}]
    csv_path = tmp_path / "numbers.csv"
    csv_path.write_text("instruction,input,output\n" + "".join(f'"{r["instruction"]}",{r["input"]},{r["output"]}\n'
                                                             for r in rows))
    bom = tmp_path / "bom.json"
    bom.write_bytes("\ufeff".encode() + json.dumps(rows).encode())
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (csv_path, bom, lines):
        got = read_raw_records(str(path))
        assert [{k: r[k] for k in ("instruction", "input", "output")} for r in got] == rows, path.name
        dm = AlpacaDataModule(data_path=str(path), val_set_size=0, batch_size=2)
        dm.connect(tiny_tokenizer)
        dm.setup()
        assert len(dm.train_data) == 3, path.name
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x", "output": "y"},')
    with pytest.raises(DataValidationError, match=r"broken\.json: not JSON"):
        read_raw_records(str(broken))


def test_trl_sft_shapes_are_recognised_and_say_how_to_map_them(records, tmp_path, tiny_tokenizer):
    """Issue 24 item 5: TRL's own {prompt, completion} records were refused with advice (skip_bad_records) that
    would drop every record. Now the error names the shape and the `fields` mapping, and the mapping trains."""
    trl = [{"prompt": r["instruction"], "completion": r["output"]} for r in records]
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    dm = AlpacaDataModule(data_path=str(tmp_path / "trl.jsonl"), val_set_size=0)
    dm.connect(tiny_tokenizer)
    with pytest.raises(DataValidationError) as err:
        dm.setup()
    message = str(err.value)
    assert "trl.jsonl: record 0" in message and "prompt-completion" in message
    assert "fields: {instruction: prompt, output: completion}" in message and "skip_bad_records" not in message
    mapped = AlpacaDataModule(data_path=str(tmp_path / "trl.jsonl"), val_set_size=0,
                              fields={"instruction": "prompt", "output": "completion"})
    mapped.connect(tiny_tokenizer)
    mapped.setup()
    assert len(mapped.train_data) == len(records)

    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "Once upon a time."}) + "\n")
    plain = AlpacaDataModule(data_path=str(tmp_path / "text.jsonl"), val_set_size=0)
    plain.connect(tiny_tokenizer)
    with pytest.raises(DataValidationError, match=r"plain \{text\} record.*\{messages") as err:
        plain.setup()
    assert "skip_bad_records" not in str(err.value)
