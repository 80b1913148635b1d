"""Base vs SFT vs RLHF on held-out prompts (`python cli.py compare`): generation, reward and judge scores,
KL to SFT, and the reward-hacking diagnostics; the report itself is `report.py`'s."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from alpaca_rlhf.data.partition import prompt_key
from alpaca_rlhf.data.prompts import PromptSource
from alpaca_rlhf.data.sft import seeded_sample
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.inference.checkpoints import (
    STAGE_TITLES,
    STAGES,
    Checkpoint,
    detect_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from alpaca_rlhf.inference.diagnostics import (  # noqa: F401  (re-exported: their old home)
    _corr,
    _mean,
    _std,
    build_rows,
    distinct_n,
    follows_template,
    hacking_flags,
    has_repeated_ngram,
    pairwise_outcomes,
    summarize,
    win_rate,
)
from alpaca_rlhf.inference.generation import (
    Generation,
    SamplingSpec,
    describe_record,
    generate_responses,
    response_logprob_sums,
)
from alpaca_rlhf.inference.plots import write_plots
from alpaca_rlhf.inference.report import markdown_report, terminal_table
from alpaca_rlhf.inference.scoring import (  # noqa: F401  (re-exported: its old home)
    _ids,
    _release_memory,
    _usable_judge,
    run_llm_judge,
    score_generations,
)

log = logging.getLogger(__name__)


# ---- held-out prompts -------------------------------------------------------------------------------------
@dataclass
class ComparePrompts(PromptSource):
    """The held-out instructions to compare on: the online stages' prompt arguments (`PromptSource`; the pipeline
    passes the RL stage's), with compare's own defaults, and how many to take.

    Attributes:
        data_path: Alpaca-format JSON/JSONL (or the seed's `{user_input}` records, conversations, HH dialogues) or
            a hub dataset name; or a list of these.
        val_set_size: Take the seeded hold-out of this size: the very prompts `PromptDataModule` (PPO's data)
            holds out with the same `seed` and `max_prompt_length`. 0 takes the file's records in order (a
            file of held-out instructions).
        part: Compare on this part of `partition` (`eval`: the prompts no stage trains on, the split by prompt
            every stage shares; `alpaca_rlhf.data.partition`). None = the seeded hold-out above.
        max_prompts: Compare on the first N of them only (with `part`: N drawn with `seed`); None = all.
    """

    data_path: str | list[str] = "alpaca_rlhf/data/samples/alpaca_sample.json"
    val_set_size: int | float = 32
    max_prompts: int | None = None


PromptSource = ComparePrompts  # noqa: F811  (compare's `prompts`, by its old name)


def held_out_records(source: ComparePrompts, tokenizer, template: PromptTemplate) -> list[dict]:
    """{instruction, input, prompt, reference} records: PPO's held-out prompts, from the very function
    (`prompt_split`) and arguments `PromptDataModule` uses, or a file's records in order (`val_set_size: 0`)."""
    if source.part is not None:  # the part itself (eval), no hold-out drawn from it
        part, _, _ = source.split_prompts(tokenizer, template, val_set_size=0)
        return [_describe(e) for e in seeded_sample(part, source.max_prompts, source.seed)]
    train, val, _ = source.split_prompts(tokenizer, template)
    kept = [_describe(e) for e in (val if source.val_set_size else train)]
    return kept[: source.max_prompts] if source.max_prompts else kept


def _describe(example: dict) -> dict:
    return {**describe_record(example), "subset": example.get("subset"), "prompt_key": prompt_key(example["record"])}


def compare(
    base_model: str | None = None,
    sft_model: str | None = None,
    rlhf_model: str | None = None,
    reward_model: str | None = None,
    judge_model: str | None = None,
    prompts: ComparePrompts = ComparePrompts(),  # noqa: B008 - read-only default, shown by --help
    sampling: SamplingSpec = SamplingSpec(temperature=1.0),  # noqa: B008 - PPO's sampling
    samples_per_prompt: int = 1,
    seed: int = 42,
    batch_size: int = 16,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    load_in_8bit: bool = False,
    report_dir: str = "output/compare",
    show: int = 3,
    width: int | None = None,
    ppo_log_dir: str | None = None,
    llm_judge: str | None = None,
    llm_judge_pairs: int = 100,
    llm_judge_rule: Literal["both_orders", "debiased"] = "both_orders",
    examples: int = 10,
) -> dict:
    """Runs the same held-out instructions through the base, SFT and RLHF models and compares the responses.

    Prints a side-by-side table and writes `<report_dir>/report.md`, `outputs.jsonl` (every response, with its
    reward score) and `summary.json`. With a reward model: each response's score, the mean per stage and the
    win rate of RLHF over SFT. With SFT and RLHF: the KL of the RLHF responses to the SFT model. Models are
    loaded one at a time (RLHF, SFT, base, reward model), so peak memory is one model.

    Args:
        base_model: The model SFT started from (folder or hub id); None leaves the stage out.
        sft_model: The merged SFT folder, or the SFT adapter folder (on its recorded base).
        rlhf_model: A PPO export step_<n>, the PPO output_dir (its latest step_<n>), or another RL stage's
            adapter folder (DPO's), on its recorded base.
        reward_model: The merged reward-model folder; None compares without scores.
        judge_model: An independent merged reward model (trained on a disjoint part of the preference data) that
            scores every stage too: the optimised RM's score rising while the judge's falls flags
            over-optimisation (Gao et al., 2022). None = no judge.
        prompts: Which held-out instructions.
        sampling: Decoding of every stage. PPO samples at temperature 1 with no top-k/top-p truncation;
            comparing under the same sampling shows what PPO optimised.
        samples_per_prompt: Responses per prompt and stage (scores and KL average over them; the tables show
            the first).
        seed: Seed of the sampling, reset before each stage so all stages draw alike.
        batch_size: Sequences per generate / forward call.
        dtype: Weight dtype; default bfloat16 on a GPU, float32 on the CPU.
        load_in_8bit: Load every model in 8 bit (bitsandbytes).
        report_dir: Where report.md, outputs.jsonl, summary.json and the PNG plots go.
        show: How many prompts to print side by side in the terminal.
        width: Terminal width of the table; default: the terminal's.
        ppo_log_dir: The PPO run's TensorBoard folder, for the training-curve plot; None reads it from the RLHF
            export's `ppo_state.json` (`log_dir`, written by PPO).
        llm_judge: A pairwise LLM judge (folder, hub id or `.gguf`; another family than the policy, trained on
            none of the preference labels; `alpaca_rlhf.inference.judge`) that compares RLHF with SFT on every
            prompt, both orders. It is validated first on `llm_judge_pairs` held-out human-labelled pairs (the
            `heldout` part of `prompts.partition`, with `prompts.part` set): its agreement is printed with its
            verdicts, and below 0.60 they are marked unreliable. None = no LLM judge.
        llm_judge_pairs: Held-out pairs the LLM judge is validated on (0 skips the validation).
        llm_judge_rule: `both_orders` (a win needs both orders, else a tie: the convention) or `debiased` (the
            two orders' log-odds summed).
        examples: Side-by-side examples in the report, drawn with `seed` (not picked), with the LLM judge's verdict.
    """
    started = time.time()
    checkpoints: dict[str, Checkpoint] = {}
    if rlhf_model:
        if not Path(rlhf_model).exists():
            raise FileNotFoundError(f"rlhf_model {rlhf_model!r} does not exist: run the RL stage (PPO or DPO) first")
        checkpoints["rlhf"] = detect_checkpoint(rlhf_model)[0]  # a PPO export or run, or a DPO adapter
    if sft_model:
        is_adapter = (Path(sft_model) / "adapter_config.json").is_file()
        checkpoints["sft"] = resolve_checkpoint("sft", **({"adapter_path": sft_model} if is_adapter
                                                           else {"merged_model_path": sft_model}))
    if base_model:
        checkpoints["base"] = resolve_checkpoint("base", model_name=base_model)
    if not checkpoints:
        raise ConfigError("nothing to compare: give at least one of base_model, sft_model, rlhf_model")
    stages = [s for s in STAGES if s in checkpoints]
    # every stage answers the same prompt text: the template of the most trained model (all are Alpaca here)
    template = PromptTemplate.load(checkpoints[stages[-1]].template)
    load_kwargs = dict(dtype=dtype, load_in_8bit=load_in_8bit)

    records: list[dict] | None = None
    generations: dict[str, list[Generation]] = {}
    rlhf_logprobs = sft_logprobs = None
    kl_temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    vocabularies, tokenizers, stop_ids = {}, {}, {}
    for stage in ["rlhf", "sft", "base"]:  # RLHF first: its responses are scored by the SFT model below
        if stage not in checkpoints:
            continue
        t0 = time.time()
        log.info("compare: loading %s: %s", STAGE_TITLES[stage], checkpoints[stage].describe())
        model, tokenizer = load_checkpoint(checkpoints[stage], **load_kwargs)
        vocabularies[stage] = tokenizer.get_vocab()
        if records is None:
            template = template.bind(tokenizer)
            records = held_out_records(prompts, tokenizer, template)
            if not records:
                raise ValueError(f"{prompts.data_path}: no held-out prompts selected")
        texts = [r["prompt"] for r in records for _ in range(samples_per_prompt)]
        torch.manual_seed(seed)
        stop_ids[stage] = template.stop_token_ids(tokenizer)  # EOS and a chat template's end of turn
        generations[stage] = generate_responses(model, tokenizer, texts, sampling, batch_size,
                                                progress=f"compare: {STAGE_TITLES[stage]} generates",
                                                stop_ids=stop_ids[stage])
        if stage == "rlhf":
            rlhf_logprobs = response_logprob_sums(model, *_ids(generations["rlhf"]), tokenizer.pad_token_id,
                                                  kl_temperature, batch_size)
        elif stage == "sft" and "rlhf" in generations and vocabularies["sft"] == vocabularies["rlhf"]:
            sft_logprobs = response_logprob_sums(model, *_ids(generations["rlhf"]), tokenizer.pad_token_id,
                                                 kl_temperature, batch_size)
        tokenizers[stage] = tokenizer
        del model
        _release_memory()
        log.info("compare: %s generated %d responses in %.0f s", stage, len(texts), time.time() - t0)

    scores: dict[str, list[float]] = {}
    rm_stats = None
    if reward_model:
        scores, rm_stats = score_generations(reward_model, records, generations, tokenizers,
                                             samples_per_prompt, batch_size, load_kwargs, stop_ids)
    judge: dict[str, list[float]] = {}
    if judge_model:
        judge, _ = score_generations(judge_model, records, generations, tokenizers, samples_per_prompt, batch_size,
                                     load_kwargs, stop_ids)
    kl = (rlhf_logprobs - sft_logprobs).tolist() if sft_logprobs is not None else None
    llm_judge = _usable_judge(llm_judge)
    llm = (run_llm_judge(llm_judge, records, generations, prompts, llm_judge_pairs, llm_judge_rule, samples_per_prompt,
                         dtype) if llm_judge and "rlhf" in generations and "sft" in generations else None)

    rows = build_rows(records, generations, scores, kl, samples_per_prompt, template, judge)
    summary = summarize(stages, rows, scores, kl, samples_per_prompt, sampling, judge)
    if llm is not None:
        summary["llm_judge"] = llm
        for row in rows:  # the verdict on each prompt's first sample, beside the answers
            if row["stage"] == "rlhf" and row["sample"] == 0:
                row["llm_judge_rlhf_vs_sft"] = llm["outcomes"][row["prompt_id"]]
    summary["examples"] = draw_examples(rows, examples, seed)
    ppo_state = checkpoints["rlhf"].ppo_state if "rlhf" in checkpoints else None
    settings = {
        "checkpoints": {s: checkpoints[s].describe() for s in stages}, "reward_model": reward_model,
        "judge_model": judge_model, "llm_judge": llm_judge,
        "reward_stats": rm_stats,
        "ppo_state": ({k: ppo_state.get(k) for k in ("algorithm", "iteration", "kl_coef", "base_model")} if ppo_state
                      else None),
        "prompts": asdict(prompts), "n_prompts": len(records), "sampling": asdict(sampling),
        "samples_per_prompt": samples_per_prompt, "seed": seed, "dtype": dtype or "auto",
        "load_in_8bit": load_in_8bit, "kl_temperature": kl_temperature,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "outputs.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    log_dir = ppo_log_dir or (ppo_state or {}).get("log_dir")
    settings["plots"] = write_plots(rows, stages, out, log_dir if log_dir and Path(log_dir).is_dir() else None,
                                    sampling.max_new_tokens)
    (out / "report.md").write_text(markdown_report(stages, rows, summary, settings, samples_per_prompt))
    (out / "summary.json").write_text(json.dumps({"summary": summary, "settings": settings}, indent=2))
    print(terminal_table(stages, rows, summary, show, width or shutil.get_terminal_size((120, 24)).columns))
    print(f"\nreport: {out / 'report.md'}\noutputs: {out / 'outputs.jsonl'}")
    return summary


def draw_examples(rows: list[dict], n: int, seed: int) -> list[int]:
    """`n` prompt ids drawn with `seed` (not chosen by hand) for the report's side-by-side examples."""
    ids = sorted({r["prompt_id"] for r in rows})
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))))


