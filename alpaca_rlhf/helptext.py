"""The help of `fit` and `validate`, shipped as text so a cold `alpaca-rlhf fit --help` needs no Lightning import.

    python -m alpaca_rlhf.helptext          # rewrite alpaca_rlhf/help/*.txt after changing versions or the CLI

Each file starts with a header naming the versions it was made with; `alpaca-rlhf fit --help` prints the text
when they match the installed ones, else builds the help live (and caches it). A test checks that the shipped
text equals the live one.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

HELP_DIR = Path(__file__).resolve().parent / "help"
WIDTH = "100"
VERSIONED = ("lightning", "jsonargparse", "alpaca-rlhf")


def versions_header() -> str:
    from importlib.metadata import version

    parts = []
    for dist in VERSIONED:
        try:
            parts.append(f"{dist}=={version(dist)}")
        except Exception:
            parts.append(f"{dist}==?")
    return "# " + " ".join(parts)


def shipped(command: str) -> str | None:
    """The shipped help text of `command` if it was made with the installed versions, else None."""
    path = HELP_DIR / f"{command}.txt"
    if not path.is_file():
        return None
    header, _, text = path.read_text().partition("\n")
    return text if header == versions_header() else None


def live(command: str) -> str:
    """`alpaca-rlhf <command> --help` built now, at the shipped width."""
    import sys

    from alpaca_rlhf.cli import lightning_cli

    buffer = io.StringIO()
    previous, program = os.environ.get("COLUMNS"), sys.argv[0]
    os.environ["COLUMNS"], sys.argv[0] = WIDTH, "alpaca-rlhf"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            lightning_cli([command, "--help"])
    finally:
        sys.argv[0] = program
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue()


def refresh() -> None:
    HELP_DIR.mkdir(exist_ok=True)
    for command in ("fit", "validate"):
        (HELP_DIR / f"{command}.txt").write_text(versions_header() + "\n" + live(command))
        print(f"written {HELP_DIR / command}.txt")


if __name__ == "__main__":
    refresh()
