"""The Trainer every `fit`/`validate` run gets: Lightning's, with `precision: auto` (precision by hardware)."""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from alpaca_rlhf.hardware import resolve_precision, warn_if_slow_bf16

ADVERT = "💡 Tip:"  # Lightning's advertisements for its cloud products: not about the user's run


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT)


def silence_adverts() -> None:
    """Drops Lightning's "💡 Tip: ... litlogger / litmodels" lines from its rank-zero log (every run printed one)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in log.filters):
            log.addFilter(_NoAdverts())


class Trainer(L.Trainer):
    """`lightning.Trainer` whose `precision` also takes `auto`: bf16-mixed where the hardware computes bf16
    natively (a CUDA GPU with bf16, a CPU with AVX512-bf16 or AMX), fp16-mixed on an older GPU, fp32 elsewhere
    (`alpaca_rlhf.hardware`). The resolved precision and the reason are logged once at start; bf16 forced on a
    CPU that only emulates it (~38x slower than fp32) is warned about. Every other argument is Lightning's.

    Args:
        precision: "auto" (by hardware, as above) or any precision Lightning takes: 32-true, bf16-mixed,
            16-mixed, bf16-true, 64-true, ... Default (None): Lightning's, 32-true.
    """

    def __init__(self, precision: Literal["auto"] | _PRECISION_INPUT | None = None, **kwargs) -> None:
        accelerator = _accelerator_of(kwargs)
        resolved, why = resolve_precision(precision, accelerator)
        if precision == "auto":
            rank_zero_info(f"precision auto -> {resolved}: {why}")
        slow = warn_if_slow_bf16(resolved, accelerator)
        if slow:
            rank_zero_warn(slow)
        silence_adverts()
        super().__init__(precision=resolved, **kwargs)


def _accelerator_of(kwargs: dict):
    # not `kwargs.get` in __init__: jsonargparse would read that as an untyped parameter and hide Lightning's type
    return kwargs["accelerator"] if "accelerator" in kwargs else "auto"
