"""The configs that ship with the package, found by name from any directory.

A wheel holds them at `alpaca_rlhf/configs/` (pyproject maps the repository's top-level `configs/` there); a
checkout or an editable install reads the repository's `configs/`. A `--config` value that is not a file here
is looked up there: `configs/tiny/sft.yaml`, `tiny/sft.yaml` and `tiny/sft` all name the same file.
`alpaca-rlhf init` copies them into a folder to edit.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
CONFIG_DIRS = (_PACKAGE / "configs", _PACKAGE.parent / "configs")  # wheel, checkout


def config_root() -> Path | None:
    """The folder holding the packaged configs (None in a broken install)."""
    return next((d for d in CONFIG_DIRS if (d / "tiny").is_dir()), None)


def find_config(path: str) -> Path | None:
    """`path` itself when it is a file, else the packaged config it names, else None."""
    if Path(path).is_file():
        return Path(path)
    root = config_root()
    if root is None:
        return None
    name = path[len("configs/"):] if path.startswith("configs/") else path
    for candidate in (root / name, root / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def packaged_names() -> list[str]:
    """Every packaged config's name (`tiny/sft`, `smol/pipeline`, `ppo`)."""
    root = config_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")) if root else []


def missing_config(path: str) -> FileNotFoundError:
    """The error for a `--config` that is neither a file nor a packaged name: the closest names, and the list."""
    names = packaged_names()
    name = path[len("configs/"):] if path.startswith("configs/") else path
    name = name[:-5] if name.endswith(".yaml") else name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return FileNotFoundError(f"config {path!r} is neither a file nor a packaged config; {hint}packaged: "
                             f"{', '.join(names)}")


def resolve_config_args(args: list[str]) -> list[str]:
    """`--config X` / `-c X` / `--config=X` with X a packaged config's name become its full path; an X that is
    neither a file nor a packaged name stops with the closest names."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            found = find_config(args[i + 1])
            if found is None and not args[i + 1].lstrip().startswith(("{", "[")):  # YAML text is allowed too
                raise missing_config(args[i + 1])
            out += [arg, str(found) if found is not None else args[i + 1]]
            i += 2
            continue
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            found = find_config(value)
            if found is None and not value.lstrip().startswith(("{", "[")):
                raise missing_config(value)
            arg = f"--config={found}"
        out.append(arg)
        i += 1
    return out


def init(directory: str = ".", force: bool = False) -> Path:
    """Copies the packaged configs into `<directory>/configs` to edit (refuses to overwrite without `force`).

    Args:
        directory: Where `configs/` is written.
        force: Overwrite an existing `configs/` there.
    """
    root = config_root()
    if root is None:
        raise FileNotFoundError("alpaca-rlhf: the packaged configs are missing from this install")
    target = Path(directory) / "configs"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    shutil.copytree(root, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    print(f"configs written to {target}: e.g. alpaca-rlhf pipeline --config {target}/tiny/pipeline.yaml")
    return target
