"""Every shipped config parses with the parser of the command that runs it (a misspelt key fails here)."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def kind(path) -> str:
    keys = set(yaml.safe_load(path.read_text()))
    if "stages" in keys:
        return "pipeline"
    if "trainer" in keys or "model" in keys:
        return "fit"
    return "compare"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_parses(path):
    from alpaca_rlhf.cli import parse_fit_config, parse_function_config

    if path.name == "judge.yaml":  # stacked on the RM config
        parse_fit_config(["--config", str(ROOT / "configs/smol/rm.yaml"), "--config", str(path)])
    elif kind(path) == "fit":
        config = parse_fit_config(["--config", str(path)])
        assert config.model.class_path.startswith("alpaca_rlhf.modules.")
    else:
        parse_function_config(kind(path), ["--config", str(path)])


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_the_shipped_help_text_is_the_live_one(command):
    """`fit --help` prints alpaca_rlhf/help/<command>.txt (no Lightning import); it must say what the live parser
    says. When this fails after a version or CLI change: python -m alpaca_rlhf.helptext"""
    from alpaca_rlhf.helptext import HELP_DIR, shipped, versions_header

    text = shipped(command)
    if text is None:  # other versions installed: the shipped text is not used, the live help is built and cached
        header = (HELP_DIR / f"{command}.txt").read_text().partition("\n")[0]
        pytest.skip(f"shipped help is for {header}, installed: {versions_header()}")
    import subprocess
    import sys

    # a fresh interpreter, as the command line has: the help lists the subclasses imported so far, and tests
    # import more (their own callbacks)
    fresh = subprocess.run([sys.executable, "-c", f"from alpaca_rlhf.helptext import live; print(live({command!r}), "
                            "end='')"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert text == fresh, "stale: python -m alpaca_rlhf.helptext"


@pytest.mark.parametrize(("args", "typo"), [
    (["fit", "-c", "tiny/sft", "--trainer.max_step", "10"], "--trainer.max_step"),
    (["compare", "-c", "tiny/compare", "--samples_per", "1"], "--samples_per"),
])
def test_no_parser_accepts_an_abbreviated_option(args, typo, tmp_path, monkeypatch, capsys):
    """`--trainer.max_step 10` was silently taken as `--trainer.max_steps` (argparse's prefix matching)."""
    from alpaca_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code not in (0, None)
    assert typo in capsys.readouterr().err
    assert not (tmp_path / "output").exists()  # nothing ran


@pytest.mark.parametrize(("args", "says"), [
    (["fit", "-c", "tiny/sft", "--trainer.max_stepz", "10"], "did you mean --trainer.max_steps"),
    (["fit", "-c", "tiny/sfx"], "did you mean tiny/sft"),
    (["pipeline", "-c", "configs/tiny/pipelin.yaml"], "did you mean tiny/pipeline"),
    (["fit"], "alpaca-rlhf fit -c tiny/sft"),
    (["generate", "--mode", "foo"], "--mode foo is not valid (choose one of 'base', 'sft', 'rlhf', 'ppo')"),
    (["generate", "--instruction", "hi", "--max_new_token", "5"], "did you mean --max_new_tokens?"),
])
def test_a_command_line_mistake_is_one_line_with_the_fix(args, says, tmp_path, monkeypatch, capsys):
    """Issue 24 item 5: these printed a 50-line usage dump before jsonargparse's message, an absolute path the user
    never typed, `typing.Literal` syntax, or "required: fit.data, fit.model"; now one line names the fix."""
    from alpaca_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALPACA_RLHF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as refused:
        main(args)
    err = capsys.readouterr().err
    assert refused.value.code in (1, 2)
    first = err.strip().splitlines()[0]
    assert first.startswith("alpaca-rlhf: error:") and says in first, err
    assert "usage:" not in err and "Traceback" not in err and str(tmp_path) not in err
    assert len(err.strip().splitlines()) <= 2, err  # the line, and at most the debug hint
