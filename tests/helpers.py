"""Test-only Lightning callbacks (importable by class_path as `tests.helpers.X`)."""

import lightning as L


class KillAtStep(L.Callback):
    """Raises after optimizer step `step`, like a killed run (checkpoints written before it stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"killed at step {trainer.global_step}")


def nan_scorer(token_ids: list[int], nan_at: list[int] | None = None):
    """A TokenIdScorer whose call number i (0-based) returns NaN for its first response when i is in `nan_at`
    (None: every call)."""
    import torch

    from alpaca_rlhf.modules.scorers import TokenIdScorer

    class _NaN(TokenIdScorer):
        calls = 0

        def forward(self, batch):
            scores = super().forward(batch)
            if nan_at is None or type(self).calls in nan_at:
                scores[0] = torch.nan
            type(self).calls += 1
            return scores

    return _NaN(token_ids)
