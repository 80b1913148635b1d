"""The comparison's pictures (PNG beside report.md): per-stage score distributions, score against response length,
and the PPO run's training curves read from its TensorBoard events.

matplotlib is optional (`pip install "alpaca-rlhf[plots]"`; the `dev` extra has it): without it, `compare`
writes the report without pictures and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alpaca_rlhf.inference.checkpoints import STAGE_TITLES

log = logging.getLogger(__name__)

PPO_CURVES = (("rollout/score", "score (centred)"), ("rollout/kl", "KL to the reference (nats / response)"),
              ("ppo/kl_coef", "KL coefficient"), ("rollout/response_length", "response length (tokens)"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    return _pyplot() is not None


def score_distributions(rows: list[dict], stages: list[str], path: Path) -> Path | None:
    """A histogram of each stage's reward-model scores (and of the judge's, when there is one)."""
    plt = _pyplot()
    keys = [k for k in ("score", "judge_score") if any(r[k] is not None for r in rows)]
    if plt is None or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for stage in stages:
            values = [r[key] for r in rows if r["stage"] == stage and r[key] is not None]
            if values:
                ax.hist(values, bins=20, histtype="step", linewidth=2, label=f"{STAGE_TITLES[stage]} (n={len(values)})")
        ax.set_xlabel("reward-model score" if key == "score" else "judge score")
        ax.set_ylabel("responses")
        ax.legend()
    fig.suptitle("Score distribution per stage")
    return _save(fig, plt, path)


def score_vs_length(rows: list[dict], stages: list[str], path: Path) -> Path | None:
    """Each response's reward-model score against its length: a reward that grows with length shows here."""
    plt = _pyplot()
    if plt is None or not any(r["score"] is not None for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in stages:
        points = [(r["response_tokens"], r["score"]) for r in rows if r["stage"] == stage and r["score"] is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), s=12, alpha=0.6, label=STAGE_TITLES[stage])
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward-model score")
    ax.legend()
    ax.set_title("Score against response length")
    return _save(fig, plt, path)


def read_scalars(log_dir: str | Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from a TensorBoard run folder (the tags it has)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    have = set(events.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags if t in have}


def ppo_curves(log_dir: str | Path, path: Path) -> Path | None:
    """Score, KL, KL coefficient and response length per PPO iteration, from the run's TensorBoard events."""
    plt = _pyplot()
    if plt is None or not Path(log_dir).is_dir():
        return None
    panels = list(PPO_CURVES)
    curves = read_scalars(log_dir, [t for t, _ in panels] + ["rollout/eos_fraction"])
    if not curves:
        return None
    if "ppo/kl_coef" not in curves:  # RLOO and GRPO have no KL controller
        panels[2] = ("rollout/eos_fraction", "responses ending with EOS")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    for ax, (tag, title) in zip(axes.flat, panels, strict=True):
        points = curves.get(tag)
        if points:
            ax.plot(*zip(*points, strict=True), linewidth=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
    fig.suptitle(f"RL training ({log_dir})")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], stages: list[str], out: Path, ppo_log_dir: str | None) -> dict[str, str]:
    """Writes every picture that applies; returns {title: file name} for the report (empty without matplotlib)."""
    if not available():
        log.warning("compare: no plots (matplotlib is not installed: pip install \"alpaca-rlhf[plots]\")")
        return {}
    written = {
        "Score distribution per stage": score_distributions(rows, stages, out / "score_distribution.png"),
        "Score against response length": score_vs_length(rows, stages, out / "score_vs_length.png"),
        "PPO training curves": ppo_curves(ppo_log_dir, out / "ppo_curves.png") if ppo_log_dir else None,
    }
    return {title: p.name for title, p in written.items() if p is not None}
