"""Writing folders whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alpaca_rlhf.errors import ConfigError

PROGRESS_ENV = "ALPACA_RLHF_PROGRESS"  # a file path: a fit run writes its progress there (trainer.ProgressFile)


def write_text_whole(path: str | os.PathLike, text: str) -> None:
    """Writes a small text file through a temporary sibling and a rename: a reader sees the old text or the new."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it replaces `target` by rename, on error it is removed.

    A reader therefore sees the old folder or the new one, never a half-written one. Renames within one
    parent folder are atomic on POSIX; the old folder is swapped aside first and deleted last.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_checkpoint_io_class():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's checkpoint writer with a local file written whole or not at all.

        Lightning's own `_atomic_save` writes through an fsspec transaction whose temporary file lives in the
        system temp folder (`tempfile.mkstemp()`); the final move is a rename only when that folder is on the same
        filesystem as the checkpoint, and a copy (killable half-way) otherwise. Here the temporary file sits beside
        the target, is flushed to disk, then renamed over it, so `last.ckpt` is always the old file or the new
        one. Remote paths (`s3://...`) keep Lightning's behaviour.
        """

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            import torch

            if "://" in str(path) or storage_options is not None:
                return super().save_checkpoint(checkpoint, path, storage_options)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    return AtomicCheckpointIO


def use_atomic_checkpoints(trainer) -> None:
    """Swaps the trainer's plain `TorchCheckpointIO` for the atomic one (a custom CheckpointIO is left alone)."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = _atomic_checkpoint_io_class()()


def check_logs_outside(module, export_dir: str | os.PathLike, option: str) -> None:
    """Refuses, before training, an export folder that holds the run's own log folder: the export replaces the
    folder whole at the end (`atomic_dir`), so the TensorBoard run inside it would be deleted."""
    export = Path(export_dir).resolve()
    for logger in getattr(module, "loggers", []) or []:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and (Path(log_dir).resolve() == export or export in Path(log_dir).resolve().parents):
            raise ConfigError(f"{option} {str(export_dir)!r} holds the run's log folder {log_dir!r}: the export "
                              "replaces that folder whole at the end of fit, deleting the logs; give the logger "
                              "another name or save_dir, or the export another folder")


def refuse_to_start_over(trainer, module, resuming: bool, overwrite: bool) -> list[Path]:
    """A new `fit` (no `--ckpt_path`) over a run that left checkpoints or an exported adapter stops with one line
    that says how to resume it or start over, instead of training from step 0 beside `last.ckpt` (Lightning then
    writes `last-v1.ckpt`) and replacing the adapter at the end. With `overwrite`, the old checkpoint files are
    removed (the adapter is replaced whole when the new run exports) and returned."""
    if resuming:
        return []
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    checkpoints = sorted(p for d in folders if d.is_dir() for p in d.glob("*.ckpt"))
    export = getattr(module, "adapter_dir", None)
    adapter = Path(export) if export and (Path(export) / "adapter_config.json").is_file() else None
    if not checkpoints and adapter is None:
        return []
    if overwrite:
        if hasattr(module, "overwrite_output_dir"):  # the online stages' step_<n> exports go too
            module.overwrite_output_dir = True
        for path in checkpoints:
            path.unlink()
        return checkpoints
    found = []
    if checkpoints:
        found.append(f"checkpoints in {checkpoints[0].parent} ({', '.join(p.name for p in checkpoints[:3])}"
                     f"{', ...' if len(checkpoints) > 3 else ''})")
    if adapter is not None:
        found.append(f"an exported adapter in {adapter}")
    raise FileExistsError(f"this run's folders already hold an earlier run: {' and '.join(found)}. Resume it with "
                          "--ckpt_path last, or start over with --overwrite (its checkpoints are removed and the "
                          "adapter is replaced at the end)")
