"""Every shipped config parses with the parser of the command that runs it (a misspelt key fails here)."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def kind(path) -> str:
    keys = set(yaml.safe_load(path.read_text()))
    if path.name == "shared.yaml":
        return "shared"
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
    elif kind(path) == "shared":  # what a family's stage files stack on: every one of them stacks on it
        stages = [p for p in path.parent.glob("*.yaml") if kind(p) == "fit" and p.name != "judge.yaml"]
        assert stages and all(yaml.safe_load(p.read_text()).get("_base_") == "shared.yaml" for p in stages)
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


def test_a_stage_file_stacks_on_its_base_and_its_own_keys_win(tmp_path):
    """`_base_` (relative to the file naming it) is read first; the file's mappings merge into it key by key, its
    lists and values replace; the command line wins over both; a base may have a base."""
    from alpaca_rlhf.cli import parse_fit_config

    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "root.yaml").write_text("seed_everything: 7\ntrainer: {accelerator: cpu, devices: 1}\n")
    (tmp_path / "family" / "shared.yaml").write_text(
        "_base_: root.yaml\ntrainer:\n  log_every_n_steps: 3\n  max_steps: 99\n  logger:\n"
        "    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        "    init_args: {save_dir: out, version: run}\n")
    stage = (ROOT / "configs/tiny/sft.yaml").read_text().replace("_base_: shared.yaml", "_base_: family/shared.yaml")
    (tmp_path / "sft.yaml").write_text(stage)
    config = parse_fit_config(["--config", str(tmp_path / "sft.yaml"), "--trainer.log_every_n_steps", "2"])
    assert config.seed_everything == 7  # the base's base
    assert config.trainer.accelerator == "cpu" and config.trainer.devices == 1
    assert config.trainer.max_steps == 120  # the stage file over its base
    assert config.trainer.log_every_n_steps == 2  # the command line over both
    logger = config.trainer.logger.init_args
    assert (logger.save_dir, logger.name, logger.version) == ("out", "sft", "run")  # merged key by key
    assert config.model.class_path == "alpaca_rlhf.modules.SFTModule"


def test_the_shipped_stacking_gives_the_settings_the_flat_files_had(monkeypatch):
    """The tiny SFT stage resolves to what configs/tiny/sft.yaml said before it stacked on shared.yaml, named as a
    user names it: relative to the working directory."""
    from alpaca_rlhf.cli import parse_fit_config

    monkeypatch.chdir(ROOT)
    t = parse_fit_config(["--config", "configs/tiny/sft.yaml"]).trainer
    assert (t.accelerator, t.devices, t.precision, t.num_sanity_val_steps, t.max_steps) == ("cpu", 1, "32-true", 0,
                                                                                             120)
    logger = t.logger.init_args
    assert (logger.save_dir, logger.name, logger.version, logger.default_hp_metric) == ("output/tiny", "sft", "run",
                                                                                         False)


@pytest.mark.parametrize(("base", "error"), [("missing.yaml", "is not a file"), ("stage.yaml", "on itself")])
def test_a_bad_base_names_the_file_and_the_key(tmp_path, base, error):
    from alpaca_rlhf.cli import parse_fit_config
    from alpaca_rlhf.errors import ConfigError

    (tmp_path / "stage.yaml").write_text(f"_base_: {base}\ntrainer: {{max_steps: 3}}\n")
    with pytest.raises(ConfigError, match=error) as caught:
        parse_fit_config(["--config", str(tmp_path / "stage.yaml")])
    assert "stage.yaml" in str(caught.value) and "_base_" in str(caught.value)


def test_the_data_renders_with_the_model_template_and_a_different_one_stops(tmp_path, monkeypatch, capsys):
    """The smol configs name `template: chat` once, on the model; their data takes it. A data template that differs
    from the model's would train on one prompt format and export another: the run stops before any model loads."""
    from alpaca_rlhf.cli import main, parse_fit_config
    from alpaca_rlhf.parsers import one_template

    config = parse_fit_config(["--config", str(ROOT / "configs/smol/sft.yaml")])
    assert config.data.init_args.template is None
    one_template(config)
    assert config.data.init_args.template == "chat" == config.model.init_args.template

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), "--data.init_args.template", "chat"])
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert "data.init_args.template is 'chat' but model.init_args.template is 'alpaca'" in err
    assert not (tmp_path / "output").exists()  # stopped before anything was built


def test_every_stage_names_its_input_model_and_export_folder_alike_and_the_old_names_still_read(tmp_path):
    """`model` and `output_dir` in every stage; an online stage's `policy` and an adapter stage's `adapter_dir` (the
    old names) still read: from YAML, from the command line, and for the pipeline's wiring."""
    from alpaca_rlhf.errors import ConfigError
    from alpaca_rlhf.models import ModelSpec
    from alpaca_rlhf.modules.policy import input_model
    from alpaca_rlhf.parsers import parse_fit_config, renamed_options
    from alpaca_rlhf.plan import StageConfig, export_dir

    for name in ("sft", "rm", "dpo", "ppo", "rloo", "grpo", "reinforce"):
        args = parse_fit_config(["--config", str(ROOT / f"configs/tiny/{name}.yaml")]).model.init_args
        assert args.model is not None and args.output_dir, name
        assert "policy" not in args or args.policy is None, name

    old = (ROOT / "configs/tiny/sft.yaml").read_text().replace("    output_dir:", "    adapter_dir:")
    (tmp_path / "old_sft.yaml").write_text(old.replace("_base_: shared.yaml",
                                                       f"_base_: {ROOT}/configs/tiny/shared.yaml"))
    assert export_dir(StageConfig("fit", str(tmp_path / "old_sft.yaml"))) == "output/tiny/lora-alpaca"

    assert renamed_options(["--model.init_args.policy.name_or_path", "x", "--model.policy={}", "--model.init_args.x"]) \
        == ["--model.init_args.model.name_or_path", "x", "--model.model={}", "--model.init_args.x"]
    spec = ModelSpec(name_or_path="m")
    assert input_model(None, spec) is spec and input_model(spec, None) is spec
    with pytest.raises(ConfigError, match="both given"):
        input_model(spec, spec)
    with pytest.raises(ConfigError, match="model.model is required"):
        input_model(None, None)
