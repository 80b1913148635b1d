"""The package is layered: a module imports only its own layer and the layers below it, at the top of the file or
inside a function, so the import graph has no cycle; and each layer imports alone, loading nothing above it."""

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alpaca_rlhf"
# bottom to top; a name is a top-level module or a subpackage of alpaca_rlhf
LAYERS = [
    ("foundation", {"errors", "io", "exports", "guards", "hardware", "schedules", "packaged", "evaluation"}),
    ("RL math", {"ppo"}),
    ("data and models", {"data", "models"}),
    ("stages", {"modules", "trainer"}),
    ("inference", {"inference", "hub"}),
    ("memory estimate", {"preflight"}),
    ("parsers", {"parsers"}),
    ("commands", {"plan", "pipeline", "preview"}),
    ("command line", {"cli", "helptext", "__main__"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package itself (its __init__ imports nothing)
    return next(i for i, (_, names) in enumerate(LAYERS) if parts[1] in names)


def imports(path: Path) -> list[tuple[str, int]]:
    """(alpaca_rlhf module, line) of every import in the file, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alpaca_rlhf"):
            names = [f"alpaca_rlhf.{a.name}" for a in node.names] if node.module == "alpaca_rlhf" else [node.module]
            found += [(name, node.lineno) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("alpaca_rlhf")]
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer(module_name(path))  # StopIteration: a module no layer names


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = module_name(path)
        for target, line in imports(path):
            if layer(target) > layer(own):
                upward.append(f"{own} (layer {LAYERS[layer(own)][0]}) imports {target} "
                              f"(layer {LAYERS[layer(target)][0]}) at line {line}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[name for name, _ in LAYERS])
def test_each_layer_imports_alone(index):
    """Import every module of a layer in a fresh interpreter: nothing of a higher layer gets loaded."""
    name, members = LAYERS[index]
    modules = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if layer(module_name(p)) == index
                     and not p.name == "__main__.py")
    higher = sorted({m for _, names in LAYERS[index + 1:] for m in names})
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.startswith('alpaca_rlhf.') and m.split('.')[1] in {higher!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"importing the {name} layer loaded {out.stdout.strip()}"


def test_the_command_line_loads_no_parser_or_framework_for_help():
    code = ("import sys\nfrom alpaca_rlhf.cli import COMMANDS, FIT_COMMANDS\nfrom alpaca_rlhf import parsers\n"
            "assert FIT_COMMANDS == parsers.FIT_COMMANDS\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0
    code = ("import sys\nimport alpaca_rlhf.cli\n"
            "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'jsonargparse', 'alpaca_rlhf.parsers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_file_is_much_over_400_lines():
    """Code files stay small enough to read whole (the data package's record readers and the generated help
    text aside)."""
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450 and "data" not in p.relative_to(PACKAGE).parts}
    assert not long, long


HEAVY_OR_OPTIONAL = {"torch", "lightning", "transformers", "peft", "safetensors", "datasets", "jsonargparse", "gguf",
                     "matplotlib", "tensorboard", "huggingface_hub"}
ON_DEMAND = {"memory estimate", "commands"}  # they load the package's heavy layers only when a command runs

def test_imports_are_at_the_top_of_a_file_with_named_exceptions():
    """Below the command line's lazy boundary (cli, helptext, parsers), a file shows what it depends on at its top.
    An import inside a function is one of: a heavy or optional third-party package (a fast `--help` and a foundation
    that loads no framework; peft imports bitsandbytes, which prints a kernel banner; plots need matplotlib), or the
    package's own heavy layers in an on-demand layer. So no import cycle hides inside a function either."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = module_name(path)
        if LAYERS[layer(own)][0] in ("parsers", "command line") or layer(own) < 0:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    names = [a.name for a in sub.names]
                elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                    names = [sub.module]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in HEAVY_OR_OPTIONAL:
                        continue
                    if name.startswith("alpaca_rlhf") and LAYERS[layer(own)][0] in ON_DEMAND:
                        continue
                    hidden.append(f"{own}:{sub.lineno} imports {name} inside {node.name}()")
    assert not hidden, "\n".join(hidden)


def test_every_name_imported_from_the_package_exists():
    """`from alpaca_rlhf.x import y` inside a function runs only when that function does, so a renamed `y` breaks
    a command that no test runs (bench/quality.py imported parse_function_config from its old home). Checked here
    for the package, cli.py and bench/ alike."""
    missing = []
    for path in sorted([*PACKAGE.rglob("*.py"), ROOT / "cli.py", *(ROOT / "bench").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] == "alpaca_rlhf"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                if not hasattr(module, alias.name) and not submodule:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)
