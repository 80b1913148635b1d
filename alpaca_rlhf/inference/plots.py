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


def score_vs_length(rows: list[dict], stages: list[str], path: Path, length_cap: int | None = None) -> Path | None:
    """Each response's reward-model score against its length, one panel per stage on shared axes (so no stage
    hides under another), with the generation's length cap marked: a reward that grows with length, or answers
    piling up at the cap, show here."""
    plt = _pyplot()
    fig = score_vs_length_figure(plt, rows, stages, length_cap) if plt else None
    return _save(fig, plt, path) if fig else None


def score_vs_length_figure(plt, rows: list[dict], stages: list[str], length_cap: int | None = None):
    shown = [s for s in stages if any(r["stage"] == s and r["score"] is not None for r in rows)]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), squeeze=False, sharex=True, sharey=True)
    for ax, stage in zip(axes[0], shown, strict=True):
        points = [(r["response_tokens"], r["score"]) for r in rows if r["stage"] == stage and r["score"] is not None]
        ax.scatter(*zip(*points, strict=True), s=12, alpha=0.6, color=f"C{stages.index(stage)}")
        if length_cap:
            ax.axvline(length_cap, linestyle="--", color="grey", linewidth=1, label=f"cap ({length_cap} tokens)")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(f"{STAGE_TITLES[stage]} (n={len(points)})", fontsize=10)
        ax.set_xlabel("response length (tokens)")
    axes[0][0].set_ylabel("reward-model score")
    fig.suptitle("Score against response length")
    return fig


def read_scalars(log_dir: str | Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from a TensorBoard run folder (the tags it has)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    have = set(events.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags if t in have}


def ppo_curves(log_dir: str | Path, path: Path) -> Path | None:
    """Score, KL, KL coefficient and response length per PPO iteration, from the run's TensorBoard events."""
    plt = _pyplot()
    fig = ppo_curves_figure(plt, log_dir) if plt and Path(log_dir).is_dir() else None
    return _save(fig, plt, path) if fig else None


def ppo_curves_figure(plt, log_dir: str | Path):
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
            if tag == "ppo/kl_coef":  # from 0: a coefficient that barely moved must not look like a steep fall
                ax.set_ylim(0, max(v for _, v in points) * 1.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
    fig.suptitle(f"RL training ({log_dir})")
    return fig


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], stages: list[str], out: Path, ppo_log_dir: str | None,
                length_cap: int | None = None) -> dict[str, str]:
    """Writes every picture that applies; returns {title: file name} for the report (empty without matplotlib)."""
    if not available():
        log.warning("compare: no plots (matplotlib is not installed: pip install \"alpaca-rlhf[plots]\")")
        return {}
    written = {
        "Score distribution per stage": score_distributions(rows, stages, out / "score_distribution.png"),
        "Score against response length": score_vs_length(rows, stages, out / "score_vs_length.png", length_cap),
        "PPO training curves": ppo_curves(ppo_log_dir, out / "ppo_curves.png") if ppo_log_dir else None,
    }
    return {title: p.name for title, p in written.items() if p is not None}
