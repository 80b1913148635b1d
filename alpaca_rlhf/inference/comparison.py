"""Base vs SFT vs RLHF on held-out prompts (`python cli.py compare`): generation, reward and judge scores,
KL to SFT, and the reward-hacking diagnostics; the report itself is `report.py`'s."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from alpaca_rlhf.data.partition import Partition, PartName, prompt_key
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.evaluation import is_refusal, win_tie_loss
from alpaca_rlhf.inference.checkpoints import (
    STAGE_TITLES,
    STAGES,
    Checkpoint,
    detect_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from alpaca_rlhf.inference.generation import (
    Generation,
    SamplingSpec,
    generate_responses,
    model_device,
    pad_prompt_responses,
    response_logprob_sums,
)
from alpaca_rlhf.inference.judge import conversation_text
from alpaca_rlhf.inference.report import markdown_report, terminal_table

log = logging.getLogger(__name__)


# ---- held-out prompts -------------------------------------------------------------------------------------
@dataclass
class PromptSource:
    """The held-out instructions to compare on.

    Attributes:
        data_path: Alpaca-format JSON/JSONL (or the seed's `{user_input}` records) or a hub dataset name.
        val_set_size: Take the seeded hold-out of this size: the very prompts `PromptDataModule` (PPO's data)
            holds out with the same `seed` and `max_prompt_length`. 0 takes the file's records in order (a
            file of held-out instructions).
        seed: Seed of the hold-out split.
        max_prompt_length: Longer prompts (in tokens) are dropped before the split, as PPO's data does.
        skip_bad_records: Drop malformed records before the split, as PPO's data does with the same option.
        max_records: Only the first N valid records before the split, as PPO's data does with the same option.
        max_prompts: Compare on the first N of them only (with `part`: N drawn with `seed`); None = all.
        part: Compare on this part of `partition` (`eval`: the prompts no stage trains on, the split by prompt
            every stage shares; `alpaca_rlhf.data.partition`). None = the seeded hold-out above.
        partition: The split's fractions and seed (the pipeline passes the stages' own).
        split: The split of a hub dataset.
        hub_config: A hub dataset's configuration name (its `name` in `datasets.load_dataset`).
        revision: A hub dataset's revision (branch, tag or commit).
        fields: Our field names -> the columns holding them, e.g. `{instruction: question, output: answer}`.
    """

    data_path: str | list[str] = "alpaca_rlhf/data/samples/alpaca_sample.json"
    val_set_size: int | float = 32
    seed: int = 42
    max_prompt_length: int = 256
    skip_bad_records: bool = False
    max_records: int | None = None
    max_prompts: int | None = None
    part: PartName | None = None
    partition: Partition | None = None
    split: str = "train"
    hub_config: str | None = None
    revision: str | None = None
    fields: dict[str, str] | None = None


def held_out_records(source: PromptSource, tokenizer, template: PromptTemplate) -> list[dict]:
    """{instruction, input, prompt, reference} records: PPO's held-out prompts, from the very function
    (`prompt_split`) and arguments `PromptDataModule` uses, or a file's records in order (`val_set_size: 0`)."""
    from alpaca_rlhf.data.prompts import prompt_split
    from alpaca_rlhf.data.sft import seeded_sample

    options = dict(split=source.split, hub_config=source.hub_config, revision=source.revision, fields=source.fields)
    if source.part is not None:  # the part itself (eval), no hold-out drawn from it
        part, _, _ = prompt_split(source.data_path, tokenizer, template, source.max_prompt_length, 0, source.seed,
                                  source.skip_bad_records, source.max_records, options, source.part, source.partition)
        return [_describe(e) for e in seeded_sample(part, source.max_prompts, source.seed)]
    train, val, _ = prompt_split(source.data_path, tokenizer, template, source.max_prompt_length,
                                 source.val_set_size, source.seed, source.skip_bad_records, source.max_records, options)
    kept = [_describe(e) for e in (val if source.val_set_size else train)]
    return kept[: source.max_prompts] if source.max_prompts else kept


def _describe(example: dict) -> dict:
    return {**_describe_record(example), "subset": example.get("subset"), "prompt_key": prompt_key(example["record"])}


def _describe_record(example: dict) -> dict:
    record = example["record"]
    if "messages" in record and "instruction" not in record:
        from alpaca_rlhf.data.prompts import prompt_messages

        turns = prompt_messages(record["messages"])
        users = [m["content"] for m in turns if m["role"] == "user"]
        reference = record["messages"][-1]["content"] if record["messages"][-1]["role"] == "assistant" else None
        last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
        return {"instruction": users[-1], "input": conversation_text(turns[:last_user]), "prompt": example["prompt"],
                "reference": reference, "conversation": conversation_text(turns)}
    if "chosen" in record and "instruction" not in record:  # an HH dialogue: its last human turn
        from alpaca_rlhf.data.preference import hh_messages, split_hh_dialogue

        instruction, context, chosen, _ = split_hh_dialogue(record["chosen"], record["rejected"])
        return {"instruction": instruction, "input": context, "prompt": example["prompt"], "reference": chosen,
                "conversation": conversation_text(hh_messages(record["chosen"], record["rejected"]))}
    instruction, extra = record.get("instruction", record.get("user_input")), record.get("input") or ""
    return {"instruction": instruction, "input": extra, "prompt": example["prompt"],
            "reference": record.get("output", record.get("completion_a")),
            "conversation": conversation_text([{"role": "user", "content": instruction + (f"\n\n{extra}" if extra
                                                                                          else "")}])}


def follows_template(text: str, ended: bool, template: PromptTemplate) -> bool:
    """Answered and stopped: EOS within the budget, and no template section (`### ...:`) in the reply."""
    return ended and bool(text) and not any(s in text for s in template.section_markers())


def pairwise_outcomes(a: list[float], b: list[float]) -> list[float]:
    """Per pair: 1 where a beats b, 0.5 on a tie, 0 where b wins."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of pairs where a beats b, ties counting half."""
    return sum(pairwise_outcomes(a, b)) / len(a)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) if xs else float("nan")


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(
    base_model: str | None = None,
    sft_model: str | None = None,
    rlhf_model: str | None = None,
    reward_model: str | None = None,
    judge_model: str | None = None,
    prompts: PromptSource = PromptSource(),  # noqa: B008 - read-only default, shown by --help
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
    import torch

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
    from alpaca_rlhf.inference.plots import write_plots

    log_dir = ppo_log_dir or (ppo_state or {}).get("log_dir")
    settings["plots"] = write_plots(rows, stages, out, log_dir if log_dir and Path(log_dir).is_dir() else None,
                                    sampling.max_new_tokens)
    (out / "report.md").write_text(markdown_report(stages, rows, summary, settings, samples_per_prompt))
    (out / "summary.json").write_text(json.dumps({"summary": summary, "settings": settings}, indent=2))
    print(terminal_table(stages, rows, summary, show, width or shutil.get_terminal_size((120, 24)).columns))
    print(f"\nreport: {out / 'report.md'}\noutputs: {out / 'outputs.jsonl'}")
    return summary


def _ids(generations: list[Generation]) -> tuple[list[list[int]], list[list[int]]]:
    return [g.prompt_ids for g in generations], [g.response_ids for g in generations]


def run_llm_judge(model: str, records: list[dict], generations: dict[str, list[Generation]], prompts: PromptSource,
                  n_pairs: int, rule: str, samples_per_prompt: int, dtype: str | None) -> dict:
    """The LLM judge's validation on held-out human labels, then RLHF vs SFT on every prompt (its first sample),
    both orders: win / tie / loss with a paired-bootstrap 95% interval."""
    from alpaca_rlhf.inference.judge import (
        JudgedPair,
        PairwiseJudge,
        format_validation,
        heldout_pairs,
        outcomes_from_log_odds,
        validate,
    )

    t0 = time.time()
    the_judge = PairwiseJudge(model, dtype=dtype or "float32")
    validation = None
    if n_pairs and prompts.part is not None:
        validation = validate(the_judge, heldout_pairs(prompts.data_path, prompts.partition, n_pairs, prompts.seed))
        log.info("compare: %s", format_validation(validation))
    first = range(0, len(generations["rlhf"]), samples_per_prompt)
    pairs = [JudgedPair(records[i // samples_per_prompt]["conversation"], generations["rlhf"][i].text,
                        generations["sft"][i].text) for i in first]
    forward, backward = the_judge.both_orders(pairs)
    outcomes = outcomes_from_log_odds(forward, backward, rule)
    other = "debiased" if rule == "both_orders" else "both_orders"
    result = {"model": model, "rule": rule, "rlhf_vs_sft": win_tie_loss(outcomes), "outcomes": outcomes,
              f"rlhf_vs_sft_{other}": win_tie_loss(outcomes_from_log_odds(forward, backward, other)),
              "validation": validation,
              "reliable": validation[rule]["reliable"] if validation else None,
              "agreement": validation[rule]["agreement"] if validation else None,
              "seconds": round(time.time() - t0, 1)}
    per_subset: dict[str, list[float]] = {}
    for i, o in zip(first, outcomes, strict=True):
        per_subset.setdefault(str(records[i // samples_per_prompt].get("subset")), []).append(o)
    if len(per_subset) > 1:
        result["rlhf_vs_sft_by_subset"] = {k: win_tie_loss(v) for k, v in sorted(per_subset.items())}
    del the_judge
    _release_memory()
    return result


def _usable_judge(path: str | None) -> str | None:
    """The judge's path with `~` expanded; None (with a warning saying how to fetch it) for a missing local file."""
    if not path:
        return None
    expanded = str(Path(path).expanduser())
    if expanded.endswith(".gguf") and not Path(expanded).is_file():
        log.warning("compare: the LLM judge %s is absent: no LLM-judge verdict in this report. Fetch it with "
                    "../shared/tools/get-judge-model.sh (Qwen2.5-Coder-0.5B-Instruct) or give --llm_judge a model",
                    expanded)
        return None
    return expanded


def draw_examples(rows: list[dict], n: int, seed: int) -> list[int]:
    """`n` prompt ids drawn with `seed` (not chosen by hand) for the report's side-by-side examples."""
    import random

    ids = sorted({r["prompt_id"] for r in rows})
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))))


def score_generations(reward_model: str, records: list[dict], generations: dict[str, list[Generation]],
                      tokenizers: dict, samples_per_prompt: int, batch_size: int,
                      load_kwargs: dict, stop_ids: dict[str, list[int]] | None = None
                      ) -> tuple[dict[str, list[float]], dict]:
    """Reward-model scores of every response, exactly as PPO's `RewardModelScorer` scores rollouts.

    Also scores two anchors on the same prompts, so a reader can judge the scale and spot reward hacking:
    an empty response (EOS at once) and, where the records have one, the dataset's own answer.

    Returns:
        ({stage: scores in generation order, "anchor/<name>": scores per prompt}, the RM's reward_stats.json).
    """
    import torch

    from alpaca_rlhf.data.sft import encode_prompt
    from alpaca_rlhf.models import ModelSpec
    from alpaca_rlhf.modules.scorers import RewardModelScorer

    cuda = torch.cuda.is_available()
    spec = ModelSpec(name_or_path=reward_model,
                     dtype=load_kwargs["dtype"] or ("bfloat16" if cuda else "float32"),
                     quantization="8bit" if load_kwargs["load_in_8bit"] else None)
    scorer = RewardModelScorer(spec, center=False, batch_size=batch_size)
    if cuda and not load_kwargs["load_in_8bit"]:
        scorer = scorer.to("cuda")
    prompts = [r["prompt"] for r in records for _ in range(samples_per_prompt)]
    scores = {stage: _score_all(scorer, prompts, gens, tokenizers[stage], batch_size, STAGE_TITLES[stage],
                                (stop_ids or {}).get(stage))
              for stage, gens in generations.items()}
    anchors = {"empty response": [""] * len(records)}
    if all(r.get("reference") for r in records):
        anchors["dataset answer"] = [r["reference"] for r in records]
    tok = scorer.tokenizer
    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in records]
    for name, texts in anchors.items():
        gens = [Generation(p, tok(t, add_special_tokens=False)["input_ids"] + scorer.end_ids, t, True)
                for p, t in zip(prompt_ids, texts, strict=True)]
        scores[f"anchor/{name}"] = _score_all(scorer, [r["prompt"] for r in records], gens, tok, batch_size,
                                              stop_ids=scorer.end_ids[-1:])
    stats = scorer.stats
    del scorer
    _release_memory()
    return scores, stats


def _score_all(scorer, prompts: list[str], gens: list[Generation], tokenizer, batch_size: int,
               label: str = "", stop_ids: list[int] | None = None) -> list[float]:
    from tqdm.auto import tqdm

    from alpaca_rlhf.modules.scorers import ScoringBatch

    device = model_device(scorer.model)
    values = []
    for i in tqdm(range(0, len(gens), batch_size), desc=f"compare: scoring {label}", unit="batch", leave=False):
        chunk = gens[i : i + batch_size]
        ids, mask, C = pad_prompt_responses(*_ids(chunk), tokenizer.pad_token_id)
        batch = ScoringBatch(prompts[i : i + batch_size], ids.to(device), mask.to(device), C, tokenizer,
                             texts=[g.text for g in chunk], stop_ids=stop_ids)
        values.extend(scorer(batch).tolist())
    return values


def build_rows(records: list[dict], generations: dict[str, list[Generation]], scores: dict[str, list[float]],
               kl: list[float] | None, samples_per_prompt: int, template: PromptTemplate,
               judge: dict[str, list[float]] | None = None) -> list[dict]:
    """One row per prompt, stage and sample: what outputs.jsonl holds."""
    rows = []
    for stage, gens in generations.items():
        for j, g in enumerate(gens):
            rows.append({
                "prompt_id": j // samples_per_prompt, "sample": j % samples_per_prompt, "stage": stage,
                "instruction": records[j // samples_per_prompt]["instruction"],
                "input": records[j // samples_per_prompt]["input"], "response": g.text,
                "score": scores[stage][j] if stage in scores else None,
                "judge_score": judge[stage][j] if judge and stage in judge else None,
                "response_tokens": len(g.response_ids),
                "ended_with_eos": g.ended, "follows_template": follows_template(g.text, g.ended, template),
                "kl_to_sft": kl[j] if stage == "rlhf" and kl is not None else None,
            })
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(rows, key=lambda r: (r["prompt_id"], order[r["stage"]], r["sample"]))


def summarize(stages: list[str], rows: list[dict], scores: dict[str, list[float]], kl: list[float] | None,
              samples_per_prompt: int, sampling: SamplingSpec, judge: dict[str, list[float]] | None = None) -> dict:
    """Per stage: score mean/std, template-following and EOS rates, length and the reward-hacking diagnostics;
    RLHF vs SFT: win rate (by the reward model and the judge) and KL."""
    judge = judge or {}
    per_stage = {}
    for stage in stages:
        mine = [r for r in rows if r["stage"] == stage]
        lengths = [float(r["response_tokens"]) for r in mine]
        texts = [r["response"] for r in mine]
        per_stage[stage] = {
            "score_mean": _mean(scores[stage]) if stage in scores else None,
            "score_std": _std(scores[stage]) if stage in scores else None,
            "judge_mean": _mean(judge[stage]) if stage in judge else None,
            "follows_template": _mean([float(r["follows_template"]) for r in mine]),
            "ended_with_eos": _mean([float(r["ended_with_eos"]) for r in mine]),
            "max_length_hit": _mean([float(not r["ended_with_eos"] and r["response_tokens"] >= sampling.max_new_tokens)
                                     for r in mine]),
            "response_tokens": _mean(lengths),
            "empty": _mean([float(not r["response"]) for r in mine]),
            "refusal": _mean([float(is_refusal(r["response"])) for r in mine]),
            "length_score_corr": _corr([r["score"] for r in mine], lengths) if stage in scores else None,
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "repeated_3gram": _mean([float(has_repeated_ngram(t, 3)) for t in texts]),
        }
    summary: dict = {"stages": per_stage}
    anchors = {k.split("/", 1)[1]: _mean(v) for k, v in scores.items() if k.startswith("anchor/")}
    if anchors:
        summary["reward_anchors"] = anchors

    def per_prompt(xs: list[float]) -> list[float]:  # mean over a prompt's samples
        return [_mean(xs[i : i + samples_per_prompt]) for i in range(0, len(xs), samples_per_prompt)]

    if "rlhf" in scores and "sft" in scores:
        by_rm = win_tie_loss(pairwise_outcomes(per_prompt(scores["rlhf"]), per_prompt(scores["sft"])))
        summary["rlhf_vs_sft"] = {"win_rate": by_rm["win_rate"], "win_rate_ci95": by_rm["ci95"], "by_rm": by_rm,
                                  "score_gain": _mean(scores["rlhf"]) - _mean(scores["sft"]),
                                  "n_prompts": len(per_prompt(scores["rlhf"]))}
        if "rlhf" in judge and "sft" in judge:
            by_judge = win_tie_loss(pairwise_outcomes(per_prompt(judge["rlhf"]), per_prompt(judge["sft"])))
            summary["rlhf_vs_sft"]["judge_win_rate"] = by_judge["win_rate"]
            summary["rlhf_vs_sft"]["judge_win_rate_ci95"] = by_judge["ci95"]
            summary["rlhf_vs_sft"]["judge_gain"] = _mean(judge["rlhf"]) - _mean(judge["sft"])
    if kl is not None:
        summary["kl_rlhf_to_sft"] = {"mean": _mean(kl), "std": _std(kl), "n": len(kl)}
    summary["reward_hacking"] = hacking_flags(summary)
    return summary


def _corr(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant."""
    mx, my = _mean(xs), _mean(ys)
    sx, sy = _std(xs), _std(ys)
    if not xs or sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (len(xs) * sx * sy)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams over all n-grams of a stage's responses."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repeated_ngram(text: str, n: int) -> bool:
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def hacking_flags(summary: dict) -> list[str]:
    """Plain-language signs that RLHF games its reward model, from the comparison's own numbers."""
    stages, flags = summary["stages"], []
    if "rlhf" not in stages or "sft" not in stages:
        return flags
    rlhf, sft = stages["rlhf"], stages["sft"]
    versus = summary.get("rlhf_vs_sft", {})
    if versus.get("score_gain", 0) > 0 and versus.get("judge_gain", 0) < 0:
        flags.append(f"the optimised reward model's score rose ({versus['score_gain']:+.3f}) while the independent "
                     f"judge's fell ({versus['judge_gain']:+.3f}): over-optimisation (Gao et al., 2022)")
    ratio = rlhf["response_tokens"] / max(sft["response_tokens"], 1e-9)
    # the reward model's taste for length shows best where lengths vary: on SFT's responses as well as RLHF's
    corrs = [(name, stages[name]["length_score_corr"]) for name in ("sft", "rlhf")
             if stages[name]["length_score_corr"] is not None]
    name, corr = max(corrs, key=lambda c: abs(c[1]), default=(None, None))
    if (ratio > 1.5 or ratio < 0.5) and corr is not None and abs(corr) > 0.3 and (corr > 0) == (ratio > 1):
        what = "length" if ratio > 1 else "brevity"
        flags.append(f"RLHF responses are {ratio:.2f}x the SFT length and the reward model's score "
                     f"{'rises' if corr > 0 else 'falls'} with length (r = {corr:+.2f} on {name.upper()}'s "
                     f"responses): the policy may be buying reward with {what}")
    if rlhf["empty"] > sft["empty"] + 0.05:
        flags.append(f"empty responses rose from {sft['empty']:.0%} to {rlhf['empty']:.0%}")
    if sft["distinct_2"] - rlhf["distinct_2"] > 0.15:
        flags.append(f"distinct-2 fell from {sft['distinct_2']:.2f} to {rlhf['distinct_2']:.2f}: the policy repeats "
                     "itself or collapsed onto a few phrasings")
    if rlhf["max_length_hit"] > sft["max_length_hit"] + 0.2:
        flags.append(f"responses that run to the length limit rose from {sft['max_length_hit']:.0%} to "
                     f"{rlhf['max_length_hit']:.0%}")
    return flags


