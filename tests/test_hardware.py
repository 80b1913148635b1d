"""Precision by hardware: `trainer.precision: auto` resolves per machine, and slow bf16 is warned about."""

from __future__ import annotations

import pytest

from alpaca_rlhf import hardware
from alpaca_rlhf.hardware import cpu_flags, resolve_precision, warn_if_slow_bf16

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Pretend to be a CPU with the given /proc/cpuinfo text."""
    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=path: cpu_flags(cpuinfo))
        hardware.cpu_has_native_bf16.cache_clear()
    yield use
    hardware.cpu_has_native_bf16.cache_clear()


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text(ZEN4)
    assert {"avx512_bf16", "avx2"} <= cpu_flags(tmp_path / "cpuinfo")
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("text", "expected"), [(AVX2_ONLY, "32-true"), (ZEN4, "bf16-mixed"),
                                                (SAPPHIRE, "bf16-mixed")], ids=["avx2", "avx512-bf16", "amx"])
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(cpu, text, expected):
    cpu(text)
    precision, why = resolve_precision("auto", "cpu")
    assert precision == expected
    assert ("no native bf16" in why) == (expected == "32-true")


def test_an_explicit_precision_is_kept(cpu):
    cpu(AVX2_ONLY)
    assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", "as configured")
    assert resolve_precision("32-true", "cpu")[0] == "32-true"


def test_bf16_forced_on_an_avx2_cpu_is_warned_about_and_not_on_a_native_one(cpu):
    cpu(AVX2_ONLY)
    message = warn_if_slow_bf16("bf16-mixed", "cpu")
    assert message and "38x slower" in message and "auto" in message
    assert warn_if_slow_bf16("32-true", "cpu") is None
    cpu(ZEN4)
    assert warn_if_slow_bf16("bf16-mixed", "cpu") is None


def test_the_trainer_takes_auto_and_logs_the_choice(cpu, caplog, tmp_path):
    from alpaca_rlhf.trainer import Trainer

    cpu(AVX2_ONLY)
    trainer = Trainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    assert trainer.precision == "32-true"
    cpu(ZEN4)
    trainer = Trainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    assert trainer.precision == "bf16-mixed"
    cpu(AVX2_ONLY)
    with pytest.warns(UserWarning, match="without native bf16"):
        Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
                default_root_dir=tmp_path)


def test_the_cli_parses_auto_and_every_smol_config_uses_it():
    import yaml

    from alpaca_rlhf.cli import parse_fit_config
    from alpaca_rlhf.parsers import stacked_yaml
    from tests.conftest import ROOT

    for name in ("sft", "rm", "ppo", "rloo", "grpo", "dpo"):
        path = ROOT / "configs" / "smol" / f"{name}.yaml"
        assert yaml.safe_load(stacked_yaml(path.read_text(), path))["trainer"]["precision"] == "auto", path
    config = parse_fit_config(["--config", str(ROOT / "configs/tiny/sft.yaml"), "--trainer.precision", "auto"])
    assert config["trainer"]["precision"] == "auto"


def test_the_cli_trainer_prints_no_lightning_advertisement(tmp_path, capsys, caplog):
    """Every run printed "💡 Tip: ... litlogger" (and "litmodels" with a default checkpoint): not about the run."""
    import logging

    from lightning.pytorch.callbacks import ModelCheckpoint

    from alpaca_rlhf.trainer import Trainer

    with caplog.at_level(logging.INFO):
        Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False,
                callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    shown = capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert "Tip:" not in shown and "litlogger" not in shown and "litmodels" not in shown
