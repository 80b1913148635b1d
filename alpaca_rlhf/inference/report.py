"""The comparison's report: `report.md` and the terminal table."""

from __future__ import annotations

import logging
import textwrap
import time

from alpaca_rlhf.evaluation import format_win_rate
from alpaca_rlhf.inference.checkpoints import STAGE_TITLES

log = logging.getLogger(__name__)

def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return (text or "*(empty)*").replace("|", "\\|").replace("\n", "<br>")


def markdown_report(stages: list[str], rows: list[dict], summary: dict, settings: dict,
                    samples_per_prompt: int) -> str:
    """report.md: what produced it, the headline numbers, and every prompt's responses side by side."""
    titles = [STAGE_TITLES[s] for s in stages]
    lines = ["# Base vs SFT vs RLHF", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by `alpaca-rlhf compare` in "
             f"{settings['seconds']} s.",
             "", "## Checkpoints", "", "| stage | weights |", "| --- | --- |"]
    lines += [f"| {STAGE_TITLES[s]} | `{settings['checkpoints'][s]}` |" for s in stages]
    if settings["reward_model"]:
        st = settings["reward_stats"] or {}
        lines.append(f"| reward model | `{settings['reward_model']}` (held-out score mean "
                     f"{_fmt(st.get('mean'))}, std {_fmt(st.get('std'))}) |")
    if settings["ppo_state"]:
        ps = settings["ppo_state"]
        algorithm = str(ps.get("algorithm") or "ppo").upper()
        coef = f", final KL coefficient {_fmt(ps.get('kl_coef'), 4)}" if ps.get("kl_coef") is not None else ""
        lines += ["", f"RLHF checkpoint: {algorithm} iteration {ps.get('iteration')}{coef}."]
    p, s = settings["prompts"], settings["sampling"]
    split = (f"the seeded hold-out of {p['val_set_size']} (seed {p['seed']}, prompts up to "
             f"{p['max_prompt_length']} tokens), as PPO's validation split holds them out of its training"
             if p["val_set_size"] else "its records in order")
    decoding = (f"sampling at temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}"
                if s["temperature"] > 0 else "greedy decoding")
    lines += ["", "## Settings", "", f"- prompts: {settings['n_prompts']} from `{p['data_path']}`, {split}",
              f"- {decoding}, at most {s['max_new_tokens']} new tokens, {samples_per_prompt} sample(s) per "
              f"prompt and stage, seed {settings['seed']} (reset before each stage)",
              f"- weights: dtype {settings['dtype']}, 8-bit {settings['load_in_8bit']}", "", "## Summary", "",
              "| stage | mean score | score std | follows template | ends with EOS | empty | mean length (tokens) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage in stages:
        st = summary["stages"][stage]
        lines.append(f"| {STAGE_TITLES[stage]} | {_fmt(st['score_mean'])} | {_fmt(st['score_std'])} | "
                     f"{st['follows_template']:.0%} | {st['ended_with_eos']:.0%} | {st['empty']:.0%} | "
                     f"{st['response_tokens']:.1f} |")
    lines += ["", "*follows template*: the response ends with EOS within the budget and starts no new "
              "`### ...` section of the template. Scores are the reward model's raw outputs (higher is "
              "better)."]
    if "reward_anchors" in summary:
        anchors = ", ".join(f"{name} {value:.3f}" for name, value in summary["reward_anchors"].items())
        lines += ["", f"Reward-model anchors on the same prompts (mean score): {anchors}. A stage that scores "
                      "near the empty response by answering with almost nothing is gaming the reward model."]
    if "rlhf_vs_sft" in summary:
        w = summary["rlhf_vs_sft"]
        judged = (f" By the independent judge RM: win rate {w['judge_win_rate']:.1%} "
                  f"{_ci(w.get('judge_win_rate_ci95'))}, mean gain {w['judge_gain']:+.3f}."
                  if "judge_win_rate" in w else "")
        lines += ["", f"**Win rate of RLHF over SFT by the optimised reward model: {w['win_rate']:.1%}** "
                      f"{_ci(w.get('win_rate_ci95'))} of {w['n_prompts']} prompts (the RLHF response's score beats "
                      "the SFT one's, averaged over a prompt's samples; ties count half; a paired bootstrap over "
                      f"prompts gives the interval); mean score gain {w['score_gain']:+.3f}.{judged} "
                      "The optimised reward model's own verdict is not evidence of a better model."]
    if summary.get("llm_judge"):
        lines += ["", "## The LLM judge (shares no labels with the reward model)", "", *llm_judge_lines(summary)]
    if "kl_rlhf_to_sft" in summary:
        k = summary["kl_rlhf_to_sft"]
        lines += ["", f"**KL(RLHF ‖ SFT) = {k['mean']:.3f} nats per response** (std {k['std']:.3f}, "
                      f"{k['n']} RLHF responses): the sum over response tokens of log π_RLHF − log π_SFT on "
                      "the RLHF model's own samples (the k1 estimator PPO penalises), logits / "
                      f"{settings['kl_temperature']}."]
    lines += ["", "## Reward-hacking diagnostics", "",
              "| stage | judge score | score~length r | distinct-1 | distinct-2 | repeats a 3-gram | hits max length |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage in stages:
        st = summary["stages"][stage]
        corr = _fmt(st.get("length_score_corr"), 2)
        lines.append(f"| {STAGE_TITLES[stage]} | {_fmt(st.get('judge_mean'))} | {corr} | "
                     f"{st['distinct_1']:.2f} | {st['distinct_2']:.2f} | {st['repeated_3gram']:.0%} | "
                     f"{st['max_length_hit']:.0%} |")
    judge_note = (f" The judge is `{settings['judge_model']}`, a reward model trained on a disjoint part of the "
                  "preference data." if settings.get("judge_model") else " No judge model was given.")
    flags = summary.get("reward_hacking", [])
    verdict = ("**RLHF looks like it games the reward model:** " + "; ".join(flags) + "." if flags else
               "**No sign of reward hacking by these checks** (judge vs reward model, length, emptiness, "
               "diversity, length-limit hits).")
    lines += ["", verdict + judge_note]
    plots = settings.get("plots")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{title}]({name})" for title, name in plots.items()]
    elif plots is not None:
        lines += ["", "(No plots: matplotlib is not installed; `pip install \"alpaca-rlhf[plots]\"`.)"]
    if summary.get("examples"):
        lines += ["", f"## {len(summary['examples'])} examples drawn with the seed (not picked)", ""]
        lines += example_lines(stages, rows, summary["examples"])
    lines += ["", "## Responses", "", "| # | instruction | " + " | ".join(titles) + " |",
              "| --- | --- | " + " | ".join("---" for _ in stages) + " |"]
    first = [r for r in rows if r["sample"] == 0]
    for pid in sorted({r["prompt_id"] for r in first}):
        mine = {r["stage"]: r for r in first if r["prompt_id"] == pid}
        any_row = next(iter(mine.values()))
        instruction = any_row["instruction"] + (f"<br>*input:* {any_row['input']}" if any_row["input"]
                                                else "")
        cells = []
        for stage in stages:
            r = mine[stage]
            score = "" if r["score"] is None else f"<br>*score {r['score']:.2f}*"
            cells.append(_cell(r["response"]) + score)
        lines.append(f"| {pid + 1} | {_cell(instruction)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    return f"[95% CI {ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""


def llm_judge_lines(summary: dict) -> list[str]:
    """The LLM judge's validation and its RLHF-vs-SFT verdict, as markdown lines."""
    llm = summary["llm_judge"]
    lines = []
    validation = llm.get("validation")
    if validation:
        r = validation[llm["rule"]]
        lo, hi = r["report"]["all"]["ci95"]
        state = "reliable" if r["reliable"] else "**UNRELIABLE** (below 0.60): its verdicts below are not evidence"
        lines.append(f"- judge `{llm['model']}`, rule `{llm['rule']}`: agreement with the human labels of "
                     f"{validation['n']} held-out pairs **{r['agreement']:.3f}** [95% CI {lo:.3f}, {hi:.3f}], "
                     f"ties {r['tie_rate']:.0%}; {state}; "
                     f"it prefers the reply shown first {validation['position_bias']:.0%} of the time")
        for name, sub in r["report"].items():
            rules = ", ".join(f"{k} {v:.3f}" for k, v in sub["rules"].items())
            lines.append(f"  - {name}: agreement {sub['accuracy']:.3f} (n {sub['n']}); rules on the same pairs: "
                         f"{rules}")
    else:
        lines.append(f"- judge `{llm['model']}`, rule `{llm['rule']}`: **not validated** (no held-out pairs: set "
                     "prompts.part and a partition)")
    lines.append(f"- **RLHF vs SFT: {format_win_rate(llm['rlhf_vs_sft'])}**")
    for key in ("rlhf_vs_sft_debiased", "rlhf_vs_sft_both_orders"):
        if key in llm:
            lines.append(f"  - by the rule `{key.removeprefix('rlhf_vs_sft_')}`: {format_win_rate(llm[key])}")
    for name, result in llm.get("rlhf_vs_sft_by_subset", {}).items():
        lines.append(f"  - {name}: {format_win_rate(result)}")
    return lines


def example_lines(stages: list[str], rows: list[dict], prompt_ids: list[int]) -> list[str]:
    verdicts = {1.0: "RLHF better", 0.5: "tie", 0.0: "SFT better"}
    lines = []
    for pid in prompt_ids:
        mine = {r["stage"]: r for r in rows if r["prompt_id"] == pid and r["sample"] == 0}
        any_row = next(iter(mine.values()))
        verdict = mine.get("rlhf", {}).get("llm_judge_rlhf_vs_sft")
        lines += [f"**#{pid + 1}** {_cell(any_row['instruction'])}" + (
            f" — LLM judge: *{verdicts.get(verdict, verdict)}*" if verdict is not None else ""), ""]
        for stage in stages:
            score = "" if mine[stage]["score"] is None else f" (RM {mine[stage]['score']:.2f})"
            lines.append(f"- {STAGE_TITLES[stage]}{score}: {_cell(mine[stage]['response']) or '(empty)'}")
        lines.append("")
    return lines


def terminal_table(stages: list[str], rows: list[dict], summary: dict, show: int, width: int) -> str:
    """The first `show` prompts with their responses in side-by-side columns, then the summary."""
    n = len(stages)
    col = max(20, (width - 3 * (n - 1)) // n)
    out = []
    first = [r for r in rows if r["sample"] == 0]
    for pid in sorted({r["prompt_id"] for r in first})[:show]:
        mine = {r["stage"]: r for r in first if r["prompt_id"] == pid}
        any_row = next(iter(mine.values()))
        head = f"#{pid + 1} {any_row['instruction']}" + (f"  [input: {any_row['input']}]" if any_row["input"]
                                                         else "")
        out += ["=" * min(width, col * n + 3 * (n - 1)), textwrap.shorten(head, width)]
        columns = []
        for stage in stages:
            r = mine[stage]
            title = STAGE_TITLES[stage] + ("" if r["score"] is None else f" (score {r['score']:.2f})")
            body = textwrap.wrap(r["response"] or "(empty)", col)[:12]
            columns.append([title, "-" * min(col, len(title))] + body)
        for i in range(max(len(c) for c in columns)):
            out.append(" | ".join((c[i] if i < len(c) else "").ljust(col) for c in columns).rstrip())
    out += ["", f"{'stage':8s} {'mean score':>10s} {'follows template':>17s} {'ends with EOS':>14s} "
                f"{'empty':>6s} {'tokens':>7s}"]
    for stage in stages:
        st = summary["stages"][stage]
        out.append(f"{STAGE_TITLES[stage]:8s} {_fmt(st['score_mean']):>10s} {st['follows_template']:>17.0%} "
                   f"{st['ended_with_eos']:>14.0%} {st['empty']:>6.0%} {st['response_tokens']:>7.1f}")
    for name, value in summary.get("reward_anchors", {}).items():
        out.append(f"{'':8s} {value:>10.3f}  <- {name} (reward-model anchor)")
    if "rlhf_vs_sft" in summary:
        w = summary["rlhf_vs_sft"]
        judge = w.get("judge_win_rate")
        out.append(f"win rate RLHF over SFT by the optimised RM: {w['win_rate']:.1%} {_ci(w.get('win_rate_ci95'))}"
                   + (f" (by the judge RM: {judge:.1%} {_ci(w.get('judge_win_rate_ci95'))})" if judge is not None
                      else ""))
    if summary.get("llm_judge"):
        out += llm_judge_lines(summary)
    for flag in summary.get("reward_hacking", []):
        out.append(f"reward hacking? {flag}")
    if "kl_rlhf_to_sft" in summary:
        kl = summary["kl_rlhf_to_sft"]["mean"]
        out.append(f"KL(RLHF || SFT) on RLHF responses: {kl:.3f} nats per response")
    return "\n".join(out)
