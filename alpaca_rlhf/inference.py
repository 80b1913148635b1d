"""Generation from any stage's checkpoint, and the base vs SFT vs RLHF comparison.

    python cli.py generate --mode ppo --ppo_model_path output/tiny/ppo_checkpoints --instruction "Hello"
    python cli.py compare --config configs/tiny/compare.yaml

A checkpoint is a base folder (or hub id) with an optional PEFT adapter on top: the base model itself, the
SFT adapter on its base or the merged SFT folder, or a PPO export `step_<n>` (adapter on the merged SFT model
named in its `ppo_state.json`). Prompts use the checkpoint's own `template.json` (Alpaca when there is none)
and only the response is returned.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from alpaca_rlhf.data.templates import PromptTemplate

log = logging.getLogger(__name__)

MODES = ("base", "sft", "ppo")
STAGES = ("base", "sft", "rlhf")
STAGE_TITLES = {"base": "base", "sft": "SFT", "rlhf": "RLHF"}


# ---- which weights -----------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """One model to generate from: `base` (folder or hub id), optionally with a PEFT `adapter` on top."""

    base: str
    adapter: str | None = None
    tokenizer: str | None = None  # folder or hub id; the adapter's folder if it has one, else base
    template: str = "alpaca"  # bundled name or a template.json path
    ppo_state: dict | None = None  # a PPO export's ppo_state.json

    def describe(self) -> str:
        return f"{self.adapter} (adapter) on {self.base}" if self.adapter else self.base


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _template_of(folder: Path) -> str:
    return str(folder / "template.json") if (folder / "template.json").is_file() else "alpaca"


def latest_export(path: str | Path) -> Path:
    """A PPO export folder: `path` itself if it holds an adapter, else the run's final export (the one its
    `ppo_state.json` marks finished; the most recently written if several are), else the largest `step_<n>`."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    steps = [p for p in path.glob("step_*") if p.name[5:].isdigit() and (p / "adapter_config.json").is_file()]
    if not steps:
        raise FileNotFoundError(f"{path}: neither a PPO export (adapter_config.json) nor a folder of "
                                "step_<n> exports")
    finished = [p for p in steps if (_read_json(p / "ppo_state.json") or {}).get("finished") is True]
    if finished:
        return max(finished, key=lambda p: (p / "ppo_state.json").stat().st_mtime)
    return max(steps, key=lambda p: int(p.name[5:]))


def resolve_base(recorded: str, export: Path) -> str:
    """The base a PPO export recorded, usually a path relative to the working directory of the PPO run.

    Tried as given, then relative to each parent of the export (the run's working directory is one of them
    when the export sits below it, as `output/.../step_<n>` does); a name found nowhere is taken as a hub id.
    """
    if Path(recorded).is_absolute() or Path(recorded).exists():
        return recorded
    for parent in export.resolve().parents:
        if (parent / recorded / "config.json").is_file():
            return str(parent / recorded)
    return recorded


def resolve_checkpoint(mode: str, model_name: str | None = None, adapter_path: str | None = None,
                       merged_model_path: str | None = None, ppo_model_path: str | None = None,
                       tokenizer_name: str | None = None) -> Checkpoint:
    """Maps the seed's inference flags to a `Checkpoint`, with a clear error for a missing or wrong one."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode == "base":
        if not model_name:
            raise ValueError("--mode base needs --model_name (hub id or folder)")
        return Checkpoint(model_name, tokenizer=tokenizer_name)
    if mode == "sft":
        if merged_model_path:
            folder = Path(merged_model_path)
            return Checkpoint(merged_model_path, tokenizer=tokenizer_name, template=_template_of(folder))
        if not adapter_path:
            raise ValueError("--mode sft needs --merged_model_path, or --adapter_path (with --model_name to "
                             "override the adapter's recorded base)")
        folder = Path(adapter_path)
        config = _read_json(folder / "adapter_config.json")
        if config is None:
            raise FileNotFoundError(f"{folder}: no adapter_config.json (is this a PEFT adapter folder?)")
        base = model_name or config["base_model_name_or_path"]
        tokenizer = tokenizer_name or (adapter_path if (folder / "tokenizer_config.json").is_file() else base)
        return Checkpoint(base, adapter_path, tokenizer, _template_of(folder))
    if not ppo_model_path:
        raise ValueError("--mode ppo needs --ppo_model_path (a PPO export step_<n>, or the PPO output_dir)")
    folder = latest_export(ppo_model_path)
    state = _read_json(folder / "ppo_state.json")
    adapter_config = _read_json(folder / "adapter_config.json")
    recorded = (state or {}).get("base_model") or adapter_config["base_model_name_or_path"]
    base = model_name or resolve_base(recorded, folder)
    tokenizer = tokenizer_name or (str(folder) if (folder / "tokenizer_config.json").is_file() else base)
    return Checkpoint(base, str(folder), tokenizer, _template_of(folder), state)


def load_checkpoint(checkpoint: Checkpoint, dtype: str | None = None, load_in_8bit: bool = False,
                    allow_cpu_offload: bool = False, offload_folder: str = "offload"):
    """(model, tokenizer) in eval mode, the tokenizer left-padding (batched generation needs it).

    Args:
        checkpoint: What to load.
        dtype: Weight dtype; None = bfloat16 on a GPU, float32 on the CPU.
        load_in_8bit: bitsandbytes 8-bit weights (works on CPU too with bitsandbytes >= 0.46).
        allow_cpu_offload: On a GPU, spread the model over GPU and CPU (`device_map="auto"`) when it does not
            fit; without a GPU there is nothing to offload from, so the model simply runs on the CPU.
        offload_folder: Where weights that fit neither GPU nor CPU memory are offloaded to disk.
    """
    from alpaca_rlhf.models import ModelSpec, load_causal_lm, load_tokenizer

    cuda = torch.cuda.is_available()
    spec = ModelSpec(name_or_path=checkpoint.base, tokenizer=checkpoint.tokenizer,
                     dtype=dtype or ("bfloat16" if cuda else "float32"),
                     quantization="8bit" if load_in_8bit else None)
    tokenizer = load_tokenizer(spec, padding_side="left")
    offload = allow_cpu_offload and cuda and not load_in_8bit
    if allow_cpu_offload and not cuda:
        print("--allow_cpu_offload: no CUDA device here, so nothing is offloaded; the whole model runs on "
              "the CPU (give the process enough RAM for it)", file=sys.stderr)
    elif allow_cpu_offload and load_in_8bit:
        print("--allow_cpu_offload with --load_in_8bit: the 8-bit weights go to one GPU (offloading them "
              "needs llm_int8_enable_fp32_cpu_offload, which ModelSpec does not expose yet); loading without "
              "offload", file=sys.stderr)
    if offload:
        placement = {"device_map": "auto", "offload_folder": offload_folder}
    elif cuda and not load_in_8bit:  # straight onto the GPU, no full copy in CPU RAM first
        placement = {"device_map": {"": torch.cuda.current_device()}}
    else:  # CPU, or 8-bit (models.py places quantized weights itself)
        placement = {}
    model = load_causal_lm(spec, trainable=False, **placement)  # models.py: the one place that loads weights
    if checkpoint.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, checkpoint.adapter, is_trainable=False)
    model.eval()
    return model, tokenizer


# ---- decoding ----------------------------------------------------------------------------------------------
@dataclass
class SamplingSpec:
    """Decoding settings, always passed explicitly so no checkpoint's generation_config.json changes them.

    Attributes:
        max_new_tokens: Longest response in tokens.
        temperature: Sampling temperature; 0 decodes greedily (top_k and top_p are then unused).
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Keep the k most likely tokens (0 = off).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def generation_config(self, tokenizer):
        from transformers import GenerationConfig

        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**(sampling if self.temperature > 0 else {"do_sample": False}),
                                max_new_tokens=self.max_new_tokens, num_beams=1, repetition_penalty=1.0,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, use_cache=True)


@dataclass
class Generation:
    """One prompt's generated response."""

    prompt_ids: list[int]  # with BOS if the tokenizer adds one, no padding
    response_ids: list[int]  # through the first EOS (included), nothing after it
    text: str  # the decoded response, special tokens dropped
    ended: bool  # the model emitted EOS within max_new_tokens


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], sampling: SamplingSpec, batch_size: int = 8,
                       streamer=None) -> list[Generation]:
    """Responses to rendered prompts, `batch_size` at a time (left padding: every row ends at its prompt)."""
    from alpaca_rlhf.ppo import first_eos_mask

    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a left-padding tokenizer (load_checkpoint gives one)")
    from alpaca_rlhf.data.sft import adds_special_tokens

    config = sampling.generation_config(tokenizer)
    device = model_device(model)
    out: list[Generation] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,  # BOS once, as encode_prompt
                        add_special_tokens=adds_special_tokens(tokenizer, prompts[i]))
        enc = {k: v.to(device) for k, v in enc.items()}
        ids = model.generate(**enc, generation_config=config, streamer=streamer)
        C = enc["input_ids"].shape[1]
        responses = ids[:, C:]  # (B, T) generated tokens, padded after EOS
        valid = first_eos_mask(responses, tokenizer.eos_token_id)  # (B, T) through the first EOS
        for row in range(responses.shape[0]):
            prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            response = responses[row][valid[row]].tolist()
            ended = bool(response) and response[-1] == tokenizer.eos_token_id
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            out.append(Generation(prompt, response, text, ended))
    return out


def pad_prompt_responses(prompt_ids: list[list[int]], response_ids: list[list[int]],
                         pad_token_id: int) -> tuple[Tensor, Tensor, int]:
    """The PPO layout: (query_responses (B, C+T), attention_mask (B, C+T), C), prompts left-padded to C and
    responses right-padded to T."""
    C = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in response_ids))
    ids = torch.full((len(prompt_ids), C + T), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        ids[i, C - len(p) : C], mask[i, C - len(p) : C] = torch.tensor(p), 1
        if r:
            ids[i, C : C + len(r)], mask[i, C : C + len(r)] = torch.tensor(r), 1
    return ids, mask, C


@torch.no_grad()
def response_logprob_sums(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                          pad_token_id: int, temperature: float = 1.0, batch_size: int = 8) -> Tensor:
    """(N,) sum over each response's tokens of log pi(y_t | x, y_<t), with logits / temperature as in PPO."""
    from alpaca_rlhf.ppo import masked_sum, response_logprobs
    from alpaca_rlhf.ppo.rollout import position_ids_from_mask

    sums = []
    device = model_device(model)
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask, C = pad_prompt_responses(prompt_ids[i : i + batch_size], response_ids[i : i + batch_size],
                                            pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        T = ids.shape[1] - C
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False, logits_to_keep=T + 1).logits[:, :-1]  # (B, T, V): response positions only
        logprobs = response_logprobs(logits, ids[:, C:], temperature)  # (B, T)
        sums.append(masked_sum(logprobs, mask[:, C:].bool(), dim=1).cpu())
    return torch.cat(sums)


# ---- generate ----------------------------------------------------------------------------------------------
def read_instructions(path: str) -> list[dict]:
    """`{instruction, input}` records (or the seed's `{user_input}`) from a JSON list or JSONL file."""
    from alpaca_rlhf.data.prompts import check_prompt
    from alpaca_rlhf.data.records import read_raw_records, validate_records

    records, _ = validate_records(read_raw_records(path), path, check_prompt)
    return [{"instruction": r.get("instruction", r.get("user_input")), "input": r.get("input") or ""}
            for r in records]


def generate(
    mode: str = "sft",
    model_name: str | None = None,
    adapter_path: str | None = None,
    merged_model_path: str | None = None,
    ppo_model_path: str | None = None,
    tokenizer_name: str | None = None,
    instruction: str | None = None,
    input: str | None = None,
    instructions_file: str | None = None,
    output_file: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    load_in_8bit: bool = False,
    allow_cpu_offload: bool = False,
    dtype: str | None = None,
    batch_size: int = 8,
    seed: int | None = 42,
    stream: bool = True,
) -> list[dict]:
    """Generates responses to Alpaca-template prompts with a base, SFT or PPO model; prints only the response.

    Args:
        mode: base (--model_name), sft (--merged_model_path, or --adapter_path on its base) or ppo
            (--ppo_model_path: a PPO export step_<n>, whose ppo_state.json names the merged SFT base).
        model_name: Base model (hub id or folder) in mode base; in the other modes, overrides the adapter's
            recorded base.
        adapter_path: SFT LoRA adapter folder (mode sft).
        merged_model_path: Merged SFT folder (mode sft), as `python cli.py merge` writes it.
        ppo_model_path: PPO export folder step_<n>, or the PPO output_dir (its latest step_<n>).
        tokenizer_name: Tokenizer to use instead of the checkpoint's.
        instruction: The instruction to answer.
        input: Optional context for the instruction (the template's Input section).
        instructions_file: JSON list or JSONL of {instruction, input} records, answered in batches.
        output_file: Write {instruction, input, response} lines here (JSONL).
        max_new_tokens: Longest response in tokens.
        temperature: Sampling temperature; 0 decodes greedily.
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Sample from the k most likely tokens (0 = off).
        load_in_8bit: Load the weights in 8 bit with bitsandbytes (GPU or CPU).
        allow_cpu_offload: On a GPU, offload what does not fit to CPU RAM (device_map="auto"); ignored, with a
            message, on a machine without a GPU.
        dtype: float32, bfloat16 or float16; default bfloat16 on a GPU, float32 on the CPU.
        batch_size: Prompts per generate call for an instructions file.
        seed: Seed of the sampling; None leaves the RNG alone.
        stream: Print a single instruction's response token by token as it is generated.
    """
    if (instruction is None) == (instructions_file is None):
        raise ValueError("give exactly one of --instruction or --instructions_file")
    records = ([{"instruction": instruction, "input": input or ""}] if instruction is not None
               else read_instructions(instructions_file))
    checkpoint = resolve_checkpoint(mode, model_name, adapter_path, merged_model_path, ppo_model_path,
                                    tokenizer_name)
    model, tokenizer = load_checkpoint(checkpoint, dtype, load_in_8bit, allow_cpu_offload)
    template = PromptTemplate.load(checkpoint.template).bind(tokenizer)
    prompts = [template.render(r["instruction"], r["input"]) for r in records]
    sampling = SamplingSpec(max_new_tokens, temperature, top_p, top_k)
    if seed is not None:
        torch.manual_seed(seed)
    streamer = None
    if stream and len(prompts) == 1:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generations = generate_responses(model, tokenizer, prompts, sampling, batch_size, streamer)
    results = [{**r, "response": g.text} for r, g in zip(records, generations, strict=True)]
    if streamer is None:
        for i, r in enumerate(results):
            header = r["instruction"] + (f"\n[input] {r['input']}" if r["input"] else "")
            print(f"### {i + 1}. {header}\n{r['response']}\n" if len(results) > 1 else r["response"])
    if output_file:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text("".join(json.dumps(r) + "\n" for r in results))
    return results


# ---- compare -----------------------------------------------------------------------------------------------
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
        max_prompts: Compare on the first N of them only; None = all.
    """

    data_path: str = "alpaca_rlhf/data/samples/alpaca_sample.json"
    val_set_size: int | float = 32
    seed: int = 42
    max_prompt_length: int = 256
    skip_bad_records: bool = False
    max_records: int | None = None
    max_prompts: int | None = None


def held_out_records(source: PromptSource, tokenizer, template: PromptTemplate) -> list[dict]:
    """{instruction, input, prompt, reference} records: PPO's held-out prompts, from the very function
    (`prompt_split`) and arguments `PromptDataModule` uses, or a file's records in order (`val_set_size: 0`)."""
    from alpaca_rlhf.data.prompts import prompt_split

    train, val, _ = prompt_split(source.data_path, tokenizer, template, source.max_prompt_length,
                                 source.val_set_size, source.seed, source.skip_bad_records, source.max_records)
    kept = [_describe(e) for e in (val if source.val_set_size else train)]
    return kept[: source.max_prompts] if source.max_prompts else kept


def _describe(example: dict) -> dict:
    record = example["record"]
    if "messages" in record and "instruction" not in record:
        from alpaca_rlhf.data.prompts import prompt_messages

        turns = prompt_messages(record["messages"])
        users = [m["content"] for m in turns if m["role"] == "user"]
        reference = record["messages"][-1]["content"] if record["messages"][-1]["role"] == "assistant" else None
        return {"instruction": users[-1], "input": "", "prompt": example["prompt"], "reference": reference}
    if "chosen" in record and "instruction" not in record:  # an HH dialogue: its last human turn
        from alpaca_rlhf.data.preference import split_hh_dialogue

        instruction, context, chosen, _ = split_hh_dialogue(record["chosen"], record["rejected"])
        return {"instruction": instruction, "input": context, "prompt": example["prompt"], "reference": chosen}
    return {"instruction": record.get("instruction", record.get("user_input")), "input": record.get("input") or "",
            "prompt": example["prompt"], "reference": record.get("output", record.get("completion_a"))}


def follows_template(text: str, ended: bool, template: PromptTemplate) -> bool:
    """Answered and stopped: EOS within the budget, and no template section (`### ...:`) in the reply."""
    return ended and bool(text) and not any(s in text for s in template.section_markers())


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of pairs where a beats b, ties counting half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) if xs else float("nan")


def _release_memory() -> None:
    import gc

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
    dtype: str | None = None,
    load_in_8bit: bool = False,
    report_dir: str = "output/compare",
    show: int = 3,
    width: int | None = None,
) -> dict:
    """Runs the same held-out instructions through the base, SFT and RLHF models and compares the responses.

    Prints a side-by-side table and writes `<report_dir>/report.md`, `outputs.jsonl` (every response, with its
    reward score) and `summary.json`. With a reward model: each response's score, the mean per stage and the
    win rate of RLHF over SFT. With SFT and RLHF: the KL of the RLHF responses to the SFT model. Models are
    loaded one at a time (RLHF, SFT, base, reward model), so peak memory is one model.

    Args:
        base_model: The model SFT started from (folder or hub id); None leaves the stage out.
        sft_model: The merged SFT folder, or the SFT adapter folder (on its recorded base).
        rlhf_model: A PPO export step_<n>, or the PPO output_dir (its latest step_<n>).
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
        report_dir: Where report.md, outputs.jsonl and summary.json go.
        show: How many prompts to print side by side in the terminal.
        width: Terminal width of the table; default: the terminal's.
    """
    started = time.time()
    checkpoints: dict[str, Checkpoint] = {}
    if rlhf_model:
        checkpoints["rlhf"] = resolve_checkpoint("ppo", ppo_model_path=rlhf_model)
    if sft_model:
        is_adapter = (Path(sft_model) / "adapter_config.json").is_file()
        checkpoints["sft"] = resolve_checkpoint("sft", **({"adapter_path": sft_model} if is_adapter
                                                           else {"merged_model_path": sft_model}))
    if base_model:
        checkpoints["base"] = resolve_checkpoint("base", model_name=base_model)
    if not checkpoints:
        raise ValueError("nothing to compare: give at least one of base_model, sft_model, rlhf_model")
    stages = [s for s in STAGES if s in checkpoints]
    # every stage answers the same prompt text: the template of the most trained model (all are Alpaca here)
    template = PromptTemplate.load(checkpoints[stages[-1]].template)
    load_kwargs = dict(dtype=dtype, load_in_8bit=load_in_8bit)

    records: list[dict] | None = None
    generations: dict[str, list[Generation]] = {}
    rlhf_logprobs = sft_logprobs = None
    kl_temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    vocabularies, tokenizers = {}, {}
    for stage in ["rlhf", "sft", "base"]:  # RLHF first: its responses are scored by the SFT model below
        if stage not in checkpoints:
            continue
        t0 = time.time()
        model, tokenizer = load_checkpoint(checkpoints[stage], **load_kwargs)
        vocabularies[stage] = tokenizer.get_vocab()
        if records is None:
            template = template.bind(tokenizer)
            records = held_out_records(prompts, tokenizer, template)
            if not records:
                raise ValueError(f"{prompts.data_path}: no held-out prompts selected")
        texts = [r["prompt"] for r in records for _ in range(samples_per_prompt)]
        torch.manual_seed(seed)
        generations[stage] = generate_responses(model, tokenizer, texts, sampling, batch_size)
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
                                             samples_per_prompt, batch_size, load_kwargs)
    judge: dict[str, list[float]] = {}
    if judge_model:
        judge, _ = score_generations(judge_model, records, generations, tokenizers, samples_per_prompt, batch_size,
                                     load_kwargs)
    kl = (rlhf_logprobs - sft_logprobs).tolist() if sft_logprobs is not None else None

    rows = build_rows(records, generations, scores, kl, samples_per_prompt, template, judge)
    summary = summarize(stages, rows, scores, kl, samples_per_prompt, sampling, judge)
    ppo_state = checkpoints["rlhf"].ppo_state if "rlhf" in checkpoints else None
    settings = {
        "checkpoints": {s: checkpoints[s].describe() for s in stages}, "reward_model": reward_model,
        "judge_model": judge_model,
        "reward_stats": rm_stats,
        "ppo_state": ({k: ppo_state.get(k) for k in ("iteration", "kl_coef", "base_model")} if ppo_state
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
    (out / "report.md").write_text(markdown_report(stages, rows, summary, settings, samples_per_prompt))
    (out / "summary.json").write_text(json.dumps({"summary": summary, "settings": settings}, indent=2))
    print(terminal_table(stages, rows, summary, show, width or shutil.get_terminal_size((120, 24)).columns))
    print(f"\nreport: {out / 'report.md'}\noutputs: {out / 'outputs.jsonl'}")
    return summary


def _ids(generations: list[Generation]) -> tuple[list[list[int]], list[list[int]]]:
    return [g.prompt_ids for g in generations], [g.response_ids for g in generations]


def score_generations(reward_model: str, records: list[dict], generations: dict[str, list[Generation]],
                      tokenizers: dict, samples_per_prompt: int, batch_size: int,
                      load_kwargs: dict) -> tuple[dict[str, list[float]], dict]:
    """Reward-model scores of every response, exactly as PPO's `RewardModelScorer` scores rollouts.

    Also scores two anchors on the same prompts, so a reader can judge the scale and spot reward hacking:
    an empty response (EOS at once) and, where the records have one, the dataset's own answer.

    Returns:
        ({stage: scores in generation order, "anchor/<name>": scores per prompt}, the RM's reward_stats.json).
    """
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
    scores = {stage: _score_all(scorer, prompts, gens, tokenizers[stage], batch_size)
              for stage, gens in generations.items()}
    anchors = {"empty response": [""] * len(records)}
    if all(r.get("reference") for r in records):
        anchors["dataset answer"] = [r["reference"] for r in records]
    tok = scorer.tokenizer
    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in records]
    for name, texts in anchors.items():
        gens = [Generation(p, tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], t, True)
                for p, t in zip(prompt_ids, texts, strict=True)]
        scores[f"anchor/{name}"] = _score_all(scorer, [r["prompt"] for r in records], gens, tok, batch_size)
    stats = scorer.stats
    del scorer
    _release_memory()
    return scores, stats


def _score_all(scorer, prompts: list[str], gens: list[Generation], tokenizer, batch_size: int) -> list[float]:
    from alpaca_rlhf.modules.scorers import ScoringBatch

    device = model_device(scorer.model)
    values = []
    for i in range(0, len(gens), batch_size):
        chunk = gens[i : i + batch_size]
        ids, mask, C = pad_prompt_responses(*_ids(chunk), tokenizer.pad_token_id)
        batch = ScoringBatch(prompts[i : i + batch_size], ids.to(device), mask.to(device), C, tokenizer,
                             texts=[g.text for g in chunk])
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
        summary["rlhf_vs_sft"] = {"win_rate": win_rate(per_prompt(scores["rlhf"]), per_prompt(scores["sft"])),
                                  "score_gain": _mean(scores["rlhf"]) - _mean(scores["sft"]),
                                  "n_prompts": len(per_prompt(scores["rlhf"]))}
        if "rlhf" in judge and "sft" in judge:
            summary["rlhf_vs_sft"]["judge_win_rate"] = win_rate(per_prompt(judge["rlhf"]), per_prompt(judge["sft"]))
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
    corr = rlhf["length_score_corr"]
    if (ratio > 1.5 or ratio < 0.5) and corr is not None and abs(corr) > 0.3:
        flags.append(f"RLHF responses are {ratio:.1f}x the SFT length and the score correlates with length "
                     f"(r = {corr:+.2f}): the policy may be buying reward with length")
    if rlhf["empty"] > sft["empty"] + 0.05:
        flags.append(f"empty responses rose from {sft['empty']:.0%} to {rlhf['empty']:.0%}")
    if sft["distinct_2"] - rlhf["distinct_2"] > 0.15:
        flags.append(f"distinct-2 fell from {sft['distinct_2']:.2f} to {rlhf['distinct_2']:.2f}: the policy repeats "
                     "itself or collapsed onto a few phrasings")
    if rlhf["max_length_hit"] > sft["max_length_hit"] + 0.2:
        flags.append(f"responses that run to the length limit rose from {sft['max_length_hit']:.0%} to "
                     f"{rlhf['max_length_hit']:.0%}")
    return flags


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
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by `python cli.py compare` in "
             f"{settings['seconds']} s.",
             "", "## Checkpoints", "", "| stage | weights |", "| --- | --- |"]
    lines += [f"| {STAGE_TITLES[s]} | `{settings['checkpoints'][s]}` |" for s in stages]
    if settings["reward_model"]:
        st = settings["reward_stats"] or {}
        lines.append(f"| reward model | `{settings['reward_model']}` (held-out score mean "
                     f"{_fmt(st.get('mean'))}, std {_fmt(st.get('std'))}) |")
    if settings["ppo_state"]:
        ps = settings["ppo_state"]
        lines += ["", f"RLHF checkpoint: PPO iteration {ps.get('iteration')}, final KL coefficient "
                      f"{_fmt(ps.get('kl_coef'), 4)}."]
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
        judged = (f" By the independent judge: win rate {w['judge_win_rate']:.1%}, mean gain {w['judge_gain']:+.3f}."
                  if "judge_win_rate" in w else "")
        lines += ["", f"**Win rate of RLHF over SFT: {w['win_rate']:.1%}** of {w['n_prompts']} prompts (the "
                      "RLHF response's score beats the SFT one's, averaged over a prompt's samples; ties "
                      f"count half); mean score gain {w['score_gain']:+.3f}.{judged}"]
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
        judge = summary["rlhf_vs_sft"].get("judge_win_rate")
        out.append(f"win rate RLHF over SFT: {summary['rlhf_vs_sft']['win_rate']:.1%}"
                   + (f" (by the judge: {judge:.1%})" if judge is not None else ""))
    for flag in summary.get("reward_hacking", []):
        out.append(f"reward hacking? {flag}")
    if "kl_rlhf_to_sft" in summary:
        kl = summary["kl_rlhf_to_sft"]["mean"]
        out.append(f"KL(RLHF || SFT) on RLHF responses: {kl:.3f} nats per response")
    return "\n".join(out)
