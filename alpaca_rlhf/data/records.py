"""Loading instruction and preference records with clear errors for bad input.

Every stage reads its records through `read_raw_records`: a hub dataset name (loaded with `datasets`, with its
configuration, split and revision), a local `.json` (a list), `.jsonl`, gzip-compressed, `.parquet`, `.csv` or
`.arrow` file, or a folder of them; an optional field map renames columns. Each record is validated before any
training starts; a bad one raises `DataValidationError` naming the file, the record's index (within its own file)
and the field, or, with `skip_bad=True`, is dropped and counted.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_rlhf.errors import DataValidationError

__all__ = ["DataValidationError", "LoadReport", "Records", "read_raw_records", "validate_records"]
log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LoadReport:
    """What loading did to the records: kept, skipped for being bad, truncated, dropped for length."""

    source: str
    total: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: {self.total} records, {self.skipped} skipped as bad, "
            f"{self.truncated} truncated, {self.dropped_too_long} dropped for length"
        )


def resolve_path(path: str) -> Path | None:
    """A local path, relative to the working directory or, failing that, to the repository root."""
    for candidate in (Path(path), PACKAGE_ROOT / path):
        if candidate.exists():
            return candidate
    return None


def _read_local(path: Path) -> list:
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is skipped
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataValidationError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    if name.endswith(".jsonl"):
        return _json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json: one object a line
            log.info("%s: not one JSON document; read as JSON Lines", path)
            return _json_lines(path, text)
        raise DataValidationError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if isinstance(data, dict) and "train" in data and isinstance(data["train"], list):
        data = data["train"]
    if not isinstance(data, list):
        raise DataValidationError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _json_lines(path: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataValidationError(f"{path}: line {lineno} is not JSON ({e.msg})") from e
    return records


def _read_csv(path: Path) -> list:
    """CSV read as text: every cell a string (a column of numbers is still an instruction's text, not a float),
    an empty cell an empty string, a byte-order mark skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [dict(row) for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataValidationError(f"{path}: cannot be read as CSV ({type(e).__name__}: {e})") from e


TABULAR = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}  # read through `datasets`' own builders
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
SUPPORTED = (*JSON_SUFFIXES, *TABULAR)


class Records(list):
    """Raw records that know where each came from: `where(i)` is "file: record j" (j within its own file)."""

    def __init__(self, records: list, files: list[tuple[str, int]]) -> None:
        super().__init__(records)
        self.files = files  # (name, number of records), in order

    def where(self, index: int) -> str:
        for name, count in self.files:
            if index < count:
                return f"{name}: record {index}"
            index -= count
        return f"record {index}"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return TABULAR.get(path.suffix.lower())


def _read_tabular(path: Path, builder: str) -> list:
    import datasets  # lazy: heavy import

    try:
        return list(datasets.load_dataset(builder, data_files=str(path), split="train"))
    except Exception as e:  # a broken file: name it
        raise DataValidationError(f"{path}: cannot be read as {builder} ({type(e).__name__}: {e})") from e


def _read_file(path: Path) -> list:
    kind = _kind(path)
    if kind == "json":
        return _read_local(path)
    if kind == "csv":
        return _read_csv(path)
    if kind is not None:
        return _read_tabular(path, kind)
    return _read_local(path)  # an unknown suffix: JSON or a clear "not JSON" error


def _is_saved_dataset(folder: Path) -> bool:
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_from_disk(folder: Path, split: str) -> list:
    import datasets

    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataValidationError(f"{folder}: has no split {split!r} (it has {sorted(data)})")
        data = data[split]
    return list(data)


def _rename_fields(records: list, fields: dict[str, str]) -> list:
    """`fields` maps our field name to the column holding it ({instruction: question})."""
    out = []
    for record in records:
        if isinstance(record, dict):
            record = dict(record)
            for ours, theirs in fields.items():
                if theirs in record:
                    record[ours] = record.pop(theirs)
        out.append(record)
    return out


SPLIT_NAMES = ("test", "train", "validation", "valid", "dev", "data")
SUBSET_KEY = "_subset"  # set on each record read from a local file: where it came from, for per-subset reports


def subset_name(path: Path) -> str:
    """A short name for the data a file holds: its folder's name when the file is named after a split
    (`helpful-base/test.jsonl.gz` -> helpful-base; `hh-rlhf-harmless/test.jsonl.gz` -> harmless), else its
    own name without suffixes."""
    stem = path.name.split(".")[0]
    name = path.parent.name if stem.lower() in SPLIT_NAMES and path.parent.name else stem
    return name.removeprefix("hh-rlhf-")


def _tag(records: list, subset: str) -> None:
    for record in records:
        if isinstance(record, dict):
            record.setdefault(SUBSET_KEY, subset)


def check_data_path(source: str | list[str] | None) -> None:
    """Raises the error `read_raw_records` would for a local data file that does not exist, at once: the CLI
    calls it before any model loads. Hub names and existing paths pass."""
    for s in (source if isinstance(source, (list, tuple)) else [source]):
        if s is None or resolve_path(str(s)) is not None:
            continue
        if str(s).lower().endswith(SUPPORTED):
            raise FileNotFoundError(f"data file {s!r} not found")
        if str(s).startswith(("/", "./", "../", "~")):  # a path, not a hub name
            raise FileNotFoundError(f"data folder {s!r} not found")


def read_raw_records(source: str | list[str], split: str = "train", hub_config: str | None = None,
                     revision: str | None = None, fields: dict[str, str] | None = None) -> Records:
    """Raw records from a local file or folder, or a hub dataset through `datasets.load_dataset`, or a list of
    those (read in order and joined).

    Local files: `.json` (a list), `.jsonl`, either gzipped, read here with line-exact errors; `.parquet`,
    `.csv` and `.arrow` through `datasets`. A folder: every such file in it and in its subfolders, in path
    order, or a `save_to_disk` folder (its `split`). A hub name takes
    `hub_config` (the dataset's configuration), `split` and `revision` (needs network). `fields` renames columns
    to the names a stage expects, e.g. `{instruction: question, output: answer}`. Each record read from a local
    file is tagged with its subset (`_subset`: `subset_name` of its file) for per-subset reports, where there is
    more than one file.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataValidationError("data_path: an empty list of sources")
        parts = [read_raw_records(s, split, hub_config, revision, fields) for s in source]
        for s, part in zip(source, parts, strict=True):
            local = resolve_path(s)
            if local is None or not local.is_dir():  # a folder tagged its files itself
                _tag(part, subset_name(local) if local is not None else str(s))
        return Records([r for p in parts for r in p], [c for p in parts for c in p.files])
    local = resolve_path(source)
    if local is not None and local.is_dir() and _is_saved_dataset(local):
        records = _load_from_disk(local, split)
        counts = [(source, len(records))]
    elif local is not None:
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.is_file() and _kind(p) is not None)
            if not files:
                raise DataValidationError(f"{source}: is a folder with no data file in it "
                                          f"({', '.join(SUPPORTED)})")
        else:
            files = [local]
        records, counts = [], []
        for path in files:
            part = _read_file(path)
            if local.is_dir():
                _tag(part, subset_name(path))
            records += part
            counts.append((str(path) if len(files) > 1 else source, len(part)))
    elif str(source).lower().endswith(SUPPORTED):
        raise FileNotFoundError(f"data file {source!r} not found")
    else:
        import datasets  # lazy: heavy import, and only hub names need it here

        records = list(datasets.load_dataset(source, hub_config, split=split, revision=revision))
        counts = [(source, len(records))]
    if fields:
        records = _rename_fields(records, fields)
    return Records(records, counts)


def validate_records(
    records: Iterable,
    source: str,
    check: Callable[[dict], tuple[str, str] | None],
    skip_bad: bool = False,
) -> tuple[list[dict], LoadReport]:
    """Keeps the records `check` accepts.

    Args:
        records: Raw records as read.
        source: Name used in messages (the file path or hub name).
        check: Returns None for a good record, or (field, problem) for a bad one.
        skip_bad: Drop bad records (and count them) instead of raising.
    """
    report = LoadReport(source)
    kept = []
    for index, record in enumerate(records):
        report.total += 1
        problem = ("<record>", f"is a {type(record).__name__}, not an object") if not isinstance(record, dict) else None
        problem = problem or check(record)
        if problem is None:
            kept.append(record)
            continue
        where = records.where(index) if isinstance(records, Records) else f"{source}: record {index}"
        message = f"{where}: field '{problem[0]}' {problem[1]}"
        if not skip_bad:
            # a record of another shape (a fields: mapping fixes it) is not a bad record to drop
            skip = " (set skip_bad_records: true to drop such records)"
            advice = "" if isinstance(problem[1], ShapeProblem) else skip
            raise DataValidationError(message + advice)
        report.skipped += 1
        if len(report.reasons) < 20:
            report.reasons.append(message)
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), report.reasons[0])
    if not kept:
        raise DataValidationError(f"{source}: no usable records ({report.summary()})")
    return kept, report


class ShapeProblem(str):
    """A problem of the whole file's shape (another library's records): skipping such records would drop them all,
    so the error does not suggest `skip_bad_records`."""


def other_sft_shape(record: dict) -> ShapeProblem | None:
    """What to do with another library's SFT record shape (TRL's `{prompt, completion}` or `{text}`), or None."""
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return ShapeProblem("is missing: this is TRL's prompt-completion shape {prompt, completion}; map it with "
                            "data.init_args.fields: {instruction: prompt, output: completion}")
    if isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list):
        return ShapeProblem("is missing: this is TRL's conversational prompt-completion shape; join each "
                            "record's prompt and completion turns into one {messages: [...]} list")
    if isinstance(record.get("text"), str) and len(record) == 1:
        return ShapeProblem("is missing: a plain {text} record has no instruction / response split, which SFT "
                            "here trains on; give {instruction, output} records (data.init_args.fields maps other "
                            "column names) or {messages: [...]} conversations")
    return None


def string_field(record: dict, name: str, *, required: bool = True, non_empty: bool = False):
    """(field, problem) if `record[name]` is not a usable string, else None."""
    if name not in record or record[name] is None:
        return (name, "is missing") if required else None
    value = record[name]
    if not isinstance(value, str):
        return name, f"must be a string, got {type(value).__name__}"
    if non_empty and not value.strip():
        return name, "is empty"
    return None


ROLES = ("system", "user", "assistant")


def check_messages(record: dict, name: str = "messages", last_role: str | None = "assistant"):
    """(field, problem) unless `record[name]` is a conversation: a non-empty list of `{role, content}` with
    roles system/user/assistant, string contents, and (if given) `last_role` as the final turn's role."""
    messages = record.get(name)
    if not isinstance(messages, list) or not messages:
        return name, "must be a non-empty list of {role, content} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"{name}[{i}]", f"must be {{role: one of {list(ROLES)}, content: a string}}"
    if last_role and messages[-1]["role"] != last_role:
        return f"{name}[{len(messages) - 1}]", f"must be the {last_role}'s turn (the response), got " \
                                               f"{messages[-1]['role']!r}"
    if last_role == "assistant" and not messages[-1]["content"].strip():
        return f"{name}[{len(messages) - 1}]", "is empty"
    if last_role == "assistant" and not any(m["role"] == "user" for m in messages[:-1]):
        return name, "has no user turn before the response"
    return None


def split_conversation(messages: list[dict]) -> tuple[list[dict], str]:
    """(the turns before the response, the response): the last assistant turn is the response."""
    return messages[:-1], messages[-1]["content"]


def check_alpaca(record: dict):
    """An Alpaca record (`instruction` and `output` non-empty strings, `input` an optional string), or a
    conversation `{messages: [{role, content}, ...]}` whose last turn, the assistant's, is the response."""
    if "messages" in record and "instruction" not in record:
        return check_messages(record)
    if "instruction" not in record and "output" not in record:
        shape = other_sft_shape(record)
        if shape:
            return "instruction", shape
    return (
        string_field(record, "instruction", non_empty=True)
        or string_field(record, "input", required=False)
        or string_field(record, "output", non_empty=True)
    )
