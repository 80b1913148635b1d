"""The Trainer every `fit`/`validate` run gets: Lightning's, with `precision: auto` (precision by hardware)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from alpaca_rlhf.hardware import resolve_precision, warn_if_slow_bf16
from alpaca_rlhf.io import PROGRESS_ENV, write_text_whole

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
        callbacks = kwargs.get("callbacks") or []
        callbacks = [*(list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]), CtrlCCheckpoint()]
        progress = os.environ.get(PROGRESS_ENV)
        if progress:  # the pipeline reads the stage's own progress from this file
            callbacks.append(ProgressFile(progress))
        kwargs["callbacks"] = callbacks
        super().__init__(precision=resolved, **kwargs)


class CtrlCCheckpoint(L.Callback):
    """Ctrl-C during training saves a checkpoint to resume from, then stops. The first Ctrl-C lets the current
    optimizer step (an RL iteration) finish, saves `last.ckpt` in the run's checkpoint folder at that step
    boundary (where the periodic checkpoints are saved, so the resumed run is the uninterrupted one, as
    `bench/kill_stress.py` checks for them) and says how to resume; a second Ctrl-C stops at once, without one.
    One process only: under a multi-process strategy Lightning's own handling is left as it is."""

    def __init__(self) -> None:
        self.requested = False
        self.saved: Path | None = None
        self._previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size != 1 or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        self._previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python

        def handler(signum, frame) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C: the usual KeyboardInterrupt
            print("\nCtrl-C: finishing this step, then saving a checkpoint to resume from (Ctrl-C again stops now, "
                  "without one)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.requested:
            return
        if pl_module.automatic_optimization and (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the gradients so far would not be in the checkpoint
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder:
            self.saved = Path(folder) / "last.ckpt"
            trainer.save_checkpoint(self.saved)
        raise KeyboardInterrupt

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt) and self.saved is not None:
            rank_zero_info(f"interrupted: saved {self.saved} at step {trainer.global_step}; resume with the same "
                           f"command and --ckpt_path last")
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class ProgressFile(L.Callback):
    """Writes the run's progress (optimizer step, total, the progress bar's loss and score, elapsed, ETA) to a JSON
    file, replaced whole at most once a second, so a parent process (the pipeline) can show it."""

    def __init__(self, path: str, every_s: float = 1.0) -> None:
        self.path, self.every_s = Path(path), every_s
        self.started = self.start_step = None
        self.written = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.start_step = time.time(), trainer.global_step
        self._write(trainer, force=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, force=True)

    def _write(self, trainer, force: bool = False) -> None:
        now = time.time()
        if not trainer.is_global_zero or (not force and now - self.written < self.every_s):
            return
        self.written = now
        step = trainer.global_step
        planned = getattr(trainer.lightning_module, "planned_optimizer_steps", None)  # RL: steps, not iterations
        total = (planned() if planned else trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                 else trainer.estimated_stepping_batches)
        total = int(total) if total != float("inf") else None
        done = step - (self.start_step or 0)
        elapsed = now - (self.started or now)
        eta = elapsed / done * (total - step) if total and done > 0 else None
        metrics = {}
        shown = sorted(trainer.progress_bar_metrics.items(), key=lambda kv: kv[0].startswith("val"))  # train first
        for key, value in shown:
            for word in ("loss", "score", "kl"):
                if word in key and word not in metrics:
                    metrics[word] = (key, float(value))
        state = {"step": step, "total": total, "elapsed_s": round(elapsed, 1),
                 "eta_s": None if eta is None else round(eta, 1), "metrics": metrics}
        write_text_whole(self.path, json.dumps(state))


def _accelerator_of(kwargs: dict):
    # not `kwargs.get` in __init__: jsonargparse would read that as an untyped parameter and hide Lightning's type
    return kwargs["accelerator"] if "accelerator" in kwargs else "auto"
