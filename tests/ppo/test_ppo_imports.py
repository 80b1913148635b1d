import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import alpaca_rlhf.ppo

# The PPO math imports plain torch and the standard library helpers below only.
ALLOWED = {"torch", "math", "dataclasses", "typing", "warnings", "__future__", "alpaca_rlhf"}
FORBIDDEN = {"lightning", "pytorch_lightning", "transformers", "peft", "numpy"}
MODULES = sorted(info.name for info in pkgutil.iter_modules(alpaca_rlhf.ppo.__path__))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_expected_modules_exist():
    assert {"advantages", "kl", "logprobs", "losses", "rewards"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_only_plain_torch(name):
    module = importlib.import_module(f"alpaca_rlhf.ppo.{name}")
    roots = _imported_roots(Path(module.__file__))
    assert not roots & FORBIDDEN
    assert roots <= ALLOWED, roots - ALLOWED


def test_package_init_imports_only_plain_torch():
    roots = _imported_roots(Path(alpaca_rlhf.ppo.__file__))
    assert not roots & FORBIDDEN
    assert roots <= ALLOWED


def test_public_api_is_exported():
    for name in alpaca_rlhf.ppo.__all__:
        assert hasattr(alpaca_rlhf.ppo, name), name
