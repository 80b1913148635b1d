"""What an online stage writes to TensorBoard beyond scalars: histograms and a table of samples (rank 0 only;
other loggers skip them)."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def _writer(module):
    logger = module.logger
    return logger.experiment if isinstance(logger, TensorBoardLogger) and module.trainer.is_global_zero else None


def add_histogram(module, tag: str, values: Tensor, step: int) -> None:
    """This iteration's values as a histogram (rank 0: its own rollout)."""
    writer = _writer(module)
    if writer is not None:
        writer.add_histogram(tag, values.detach().float().cpu(), step)


def add_samples(module, prompts: list[str], responses: list[str], scores: Tensor, step: int, n: int = 4) -> None:
    """A markdown table of the first `n` prompts (the instruction part), responses and scores."""
    writer = _writer(module)
    if writer is None:
        return
    rows = ["| prompt | response | score |", "| --- | --- | --- |"]
    for p, r, s in list(zip(prompts, responses, scores.tolist(), strict=True))[:n]:
        instruction = p.split("### Instruction:")[-1].split("### Response:")[0].strip()
        rows.append(f"| {md(instruction)} | {md(r)} | {s:.3f} |")
    writer.add_text("samples/rollout", "\n".join(rows), step)


def md(text: str, limit: int = 300) -> str:
    return text[:limit].replace("|", "\\|").replace("\n", " ")
