"""Test-only Lightning callbacks (importable by class_path as `tests.helpers.X`)."""

import lightning as L


class KillAtStep(L.Callback):
    """Raises after optimizer step `step`, like a killed run (checkpoints written before it stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"killed at step {trainer.global_step}")
