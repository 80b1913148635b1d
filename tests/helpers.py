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


class SigkillAt(L.Callback):
    """`kill -9` of this very process at one point of a run (fault injection; nothing of Python runs after it).

    point:
      mid_step         after step `step`'s backward, before its optimizer step;
      checkpoint_write during the first checkpoint file written at step `step`, after half its bytes;
      before_export    after training, before the module writes its export (callbacks' on_fit_end runs first).
    """

    def __init__(self, point: str, step: int = 0) -> None:
        if point not in ("mid_step", "checkpoint_write", "before_export"):
            raise ValueError(f"unknown kill point {point!r}")
        self.point, self.step = point, step

    @staticmethod
    def _die() -> None:
        import os
        import signal
        import sys

        sys.stderr.write("SigkillAt: kill -9\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # global_step counts finished steps: step `step` is running when it equals step - 1
        if self.point == "mid_step" and trainer.global_step == self.step - 1:
            self._die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.point != "checkpoint_write" or trainer.global_step != self.step:
            return
        import io

        import torch

        real_save = torch.save

        def half_then_die(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            if hasattr(f, "write"):
                f.write(data[: len(data) // 2])
                f.flush()
            else:
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
            self._die()

        torch.save = half_then_die

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.point == "before_export":
            self._die()


def _rank_skewed_ppo():
    from alpaca_rlhf.modules import PPOModule

    class RankSkewedKLPPO(PPOModule):
        """PPO whose rank 0 sees a huge minibatch KL and rank 1 a zero one: decided per rank, rank 0 would stop
        after its first epoch while rank 1 went on into collectives rank 0 never joins (a hang). Each rank
        writes how many epochs it ran to epochs_rank<r>.txt."""

        def stop_early(self, minibatch_kl) -> bool:
            skewed = minibatch_kl * 0 + (100.0 if self.global_rank == 0 else 0.0)
            return super().stop_early(skewed)

        def log_stats(self, stats: dict, batch_size: int) -> None:
            super().log_stats(stats, batch_size)
            with open(f"epochs_rank{self.global_rank}.txt", "a") as f:
                f.write(f"{int(self.last_stats['ppo/epochs_run'])}\n")

    return RankSkewedKLPPO


def __getattr__(name: str):  # tests.helpers.RankSkewedKLPPO, imported only when a config names it
    if name == "RankSkewedKLPPO":
        return _rank_skewed_ppo()
    raise AttributeError(name)
