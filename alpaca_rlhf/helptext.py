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

    from alpaca_rlhf.parsers import lightning_cli

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


def help_cache_key(argv: list[str]) -> str:
    """Changes with the command, the terminal width, the versions of the parsers, and any source file here."""
    import hashlib
    import shutil
    from importlib.metadata import version
    from pathlib import Path

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256(" ".join(argv).encode())
    digest.update(str(shutil.get_terminal_size().columns).encode())
    for dist in ("lightning", "jsonargparse", "alpaca-rlhf"):
        try:
            digest.update(version(dist).encode())
        except Exception:  # not installed as a distribution (a bare checkout)
            digest.update(dist.encode())
    for source in sorted(package.rglob("*.py")):
        stat = source.stat()
        digest.update(f"{source.relative_to(package)}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return digest.hexdigest()[:16]


def cached_help(argv: list[str], build) -> None:
    """`fit --help` needs Lightning's import (~3 s cold): the package ships the text (`alpaca_rlhf/help`, made
    for the pinned versions); with other versions the text built on first use is kept in the cache folder
    (`$ALPACA_RLHF_CACHE`, else ~/.cache/alpaca_rlhf) and shown from there until a version or source changes."""
    import contextlib
    import io
    import os
    from pathlib import Path

    text = shipped(argv[0])  # made with these versions and shipped: no Lightning import at all
    if text is not None:
        print(text, end="")
        raise SystemExit(0)
    cache = Path(os.environ.get("ALPACA_RLHF_CACHE", Path.home() / ".cache" / "alpaca_rlhf")) / "help"
    path = cache / f"{argv[0]}-{help_cache_key(argv)}.txt"
    if path.is_file():
        print(path.read_text(), end="")
        raise SystemExit(0)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            build()
    except SystemExit as exit_:
        text = buffer.getvalue()
        print(text, end="")
        if exit_.code in (0, None) and text:
            with contextlib.suppress(OSError):
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(text)
                os.replace(tmp, path)
        raise
