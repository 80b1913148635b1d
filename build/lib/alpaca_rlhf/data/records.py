"""Loading instruction and preference records with clear errors for bad input.

Every stage reads its records through `load_records`: a hub dataset name (loaded with `datasets`) or a local
`.json` (a list), `.jsonl` or gzip-compressed file. Each record is validated before any training starts; a bad
one raises `DataValidationError` naming the file, the record's index and the field, or, with `skip_bad=True`, is
dropped and counted.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_rlhf.errors import DataValidationError

__all__ = ["DataValidationError", "LoadReport", "read_raw_records", "validate_records"]
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
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataValidationError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    if name.endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataValidationError(f"{path}: line {lineno} is not JSON ({e.msg})") from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataValidationError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if isinstance(data, dict) and "train" in data and isinstance(data["train"], list):
        data = data["train"]
    if not isinstance(data, list):
        raise DataValidationError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def read_raw_records(source: str, split: str = "train") -> list:
    """Raw records from a local file, or from the hub through `datasets.load_dataset` (needs network)."""
    local = resolve_path(source)
    if local is not None:
        if local.is_dir():
            raise DataValidationError(f"{source}: is a folder; give a .json, .jsonl or .jsonl.gz file")
        return _read_local(local)
    if source.endswith((".json", ".jsonl", ".gz")):
        raise FileNotFoundError(f"data file {source!r} not found")
    import datasets  # lazy: heavy import, and only hub names need it here

    return list(datasets.load_dataset(source, split=split))


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
        message = f"{source}: record {index}: field '{problem[0]}' {problem[1]}"
        if not skip_bad:
            raise DataValidationError(message + " (set skip_bad_records: true to drop such records)")
        report.skipped += 1
        if len(report.reasons) < 20:
            report.reasons.append(message)
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), report.reasons[0])
    if not kept:
        raise DataValidationError(f"{source}: no usable records ({report.summary()})")
    return kept, report


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
    return (
        string_field(record, "instruction", non_empty=True)
        or string_field(record, "input", required=False)
        or string_field(record, "output", non_empty=True)
    )
