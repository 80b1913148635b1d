"""Generation from any stage's checkpoint (`python cli.py generate`): sampling settings, batched generation that
returns only the response, and the log-probabilities of given responses."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import TextStreamer

from alpaca_rlhf.data.preference import hh_messages, split_hh_dialogue
from alpaca_rlhf.data.prompts import check_prompt, prompt_messages, render_prompt
from alpaca_rlhf.data.records import read_raw_records, validate_records
from alpaca_rlhf.data.sft import adds_special_tokens
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.inference.checkpoints import Checkpoint, detect_checkpoint, load_checkpoint, resolve_checkpoint
from alpaca_rlhf.inference.judge import conversation_text
from alpaca_rlhf.models.specs import SamplingSpec  # noqa: F401  (re-exported: its old home)
from alpaca_rlhf.ppo import first_eos_mask, masked_sum, response_logprobs, response_positions
from alpaca_rlhf.ppo.rollout import position_ids_from_mask

log = logging.getLogger(__name__)

@dataclass
class Generation:
    """One prompt's generated response."""

    prompt_ids: list[int]  # with BOS if the tokenizer adds one, no padding
    response_ids: list[int]  # through the first stop token (included), nothing after it
    text: str  # the decoded response, special tokens dropped
    ended: bool  # the model emitted a stop token (EOS, or its template's end of turn) within max_new_tokens


def model_device(model):  # -> torch.device (torch is imported lazily here)
    return next(model.parameters()).device


def generate_responses(model, tokenizer, prompts: list[str], sampling: SamplingSpec, batch_size: int = 8,
                       streamer=None, progress: str | None = None,
                       stop_ids: list[int] | None = None) -> list[Generation]:
    """Responses to rendered prompts, `batch_size` at a time (left padding: every row ends at its prompt); with
    `progress`, a progress bar of that name over the batches (on stderr). A response ends at any of `stop_ids`
    (`PromptTemplate.stop_token_ids`: EOS and a chat template's end of turn; default EOS)."""

    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a left-padding tokenizer (load_checkpoint gives one)")

    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    config = sampling.generation_config(tokenizer, stop_ids)
    device = model_device(model)
    out: list[Generation] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        starts = tqdm(starts, desc=progress, unit="batch", total=len(starts))
    for i in starts:
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,  # BOS once, as encode_prompt
                        add_special_tokens=adds_special_tokens(tokenizer, prompts[i]))
        enc = {k: v.to(device) for k, v in enc.items()}
        ids = model.generate(**enc, generation_config=config, streamer=streamer)
        C = enc["input_ids"].shape[1]
        responses = ids[:, C:]  # (B, T) generated tokens, padded after EOS
        valid = first_eos_mask(responses, stop_ids)  # (B, T) through the first stop token
        for row in range(responses.shape[0]):
            prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            response = responses[row][valid[row]].tolist()
            ended = bool(response) and response[-1] in stop_ids
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            out.append(Generation(prompt, response, text, ended))
    return out


def pad_prompt_responses(prompt_ids: list[list[int]], response_ids: list[list[int]],
                         pad_token_id: int) -> tuple:
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


def response_logprob_sums(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                          pad_token_id: int, temperature: float = 1.0, batch_size: int = 8):
    """(N,) sum over each response's tokens of log pi(y_t | x, y_<t), with logits / temperature as in PPO."""
    with torch.no_grad():  # scoring only
        sums = []
        device = model_device(model)
        for i in range(0, len(prompt_ids), batch_size):
            ids, mask, C = pad_prompt_responses(prompt_ids[i : i + batch_size], response_ids[i : i + batch_size],
                                                pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            T = ids.shape[1] - C
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False, logits_to_keep=response_positions(C, T, device)).logits  # (B, T, V)
            logprobs = response_logprobs(logits, ids[:, C:], temperature)  # (B, T)
            sums.append(masked_sum(logprobs, mask[:, C:].bool(), dim=1).cpu())
        return torch.cat(sums)


def describe_record(example: dict) -> dict:
    """{instruction, input, prompt, reference, conversation} of a rendered prompt record (`{record, prompt}`):
    Alpaca, the seed's `{user_input}`, a conversation (its last user turn) or an HH dialogue (its last human turn)."""
    record = example["record"]
    if "messages" in record and "instruction" not in record:
        turns = prompt_messages(record["messages"])
        users = [m["content"] for m in turns if m["role"] == "user"]
        reference = record["messages"][-1]["content"] if record["messages"][-1]["role"] == "assistant" else None
        last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
        return {"instruction": users[-1], "input": conversation_text(turns[:last_user]), "prompt": example["prompt"],
                "reference": reference, "conversation": conversation_text(turns)}
    if "chosen" in record and "instruction" not in record:  # an HH dialogue: its last human turn
        instruction, context, chosen, _ = split_hh_dialogue(record["chosen"], record["rejected"])
        return {"instruction": instruction, "input": context, "prompt": example["prompt"], "reference": chosen,
                "conversation": conversation_text(hh_messages(record["chosen"], record["rejected"]))}
    instruction, extra = record.get("instruction", record.get("user_input")), record.get("input") or ""
    return {"instruction": instruction, "input": extra, "prompt": example["prompt"],
            "reference": record.get("output", record.get("completion_a")),
            "conversation": conversation_text([{"role": "user", "content": instruction + (f"\n\n{extra}" if extra
                                                                                          else "")}])}


# ---- generate ----------------------------------------------------------------------------------------------
def read_instructions(path: str, template: PromptTemplate) -> list[dict]:
    """`{instruction, input, prompt}` of every record of a file: Alpaca `{instruction, input}`, the seed's
    `{user_input}`, a conversation `{messages}` or an HH dialogue `{chosen, rejected}`, each rendered as PPO
    renders it (`template` bound to the tokenizer): a conversation's last user turn is its instruction."""
    records, _ = validate_records(read_raw_records(path), path, check_prompt)
    out = []
    for record in records:
        described = describe_record({"record": record, "prompt": render_prompt(record, template)})
        out.append({k: described[k] or "" for k in ("instruction", "input", "prompt")})
    return out


def generate(
    model: str | None = None,
    mode: Literal["base", "sft", "rlhf", "ppo"] | None = None,
    base_model: str | None = None,
    sft_model: str | None = None,
    rlhf_model: str | None = None,
    model_name: str | None = None,
    adapter_path: str | None = None,
    merged_model_path: str | None = None,
    ppo_model_path: str | None = None,
    tokenizer_name: str | None = None,
    instruction: str | None = None,
    input: str | None = None,
    instructions_file: str | None = None,
    output_file: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    load_in_8bit: bool = False,
    allow_cpu_offload: bool = False,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    batch_size: int = 8,
    seed: int | None = 42,
    stream: bool = True,
) -> list[dict]:
    """Answers instructions with any stage's model (base, SFT or RLHF); prints only the response.

    One path is enough: `--model` takes any stage's output and detects its kind. The stage flags are
    `compare`'s (`--base_model`, `--sft_model`, `--rlhf_model`); the seed's flag names still work.

    Args:
        model: Any stage's output, its kind detected: a PPO export step_<n> or PPO output_dir, an SFT adapter
            folder (on its recorded base), a merged folder, a base folder, a .gguf file or a hub id.
        mode: Which stage, when the stage flags below are used: base, sft or rlhf (ppo: the seed's name for rlhf);
            None = the stage whose flag is given.
        base_model: The base model (hub id or folder), as compare's --base_model.
        sft_model: The merged SFT folder or the SFT adapter folder, as compare's --sft_model.
        rlhf_model: A PPO export step_<n>, or the PPO output_dir (its latest step_<n>), as compare's --rlhf_model.
        model_name: The seed's name for the base model; with an adapter, overrides its recorded base.
        adapter_path: The seed's SFT LoRA adapter folder (mode sft).
        merged_model_path: The seed's merged SFT folder (mode sft).
        ppo_model_path: The seed's PPO export folder (mode ppo), = --rlhf_model.
        tokenizer_name: Tokenizer to use instead of the checkpoint's.
        instruction: The instruction to answer.
        input: Optional context for the instruction (the template's Input section).
        instructions_file: JSON list or JSONL of {instruction, input} records, answered in batches.
        output_file: Write {instruction, input, response} lines here (JSONL).
        chat: Talk with the model: read turns from stdin, stream each answer; the conversation is kept (the
            chat template renders it; the Alpaca template gets the earlier turns as its input). `/reset`
            forgets it, `/exit` or end of input stops.
        max_new_tokens: Longest response in tokens.
        temperature: Sampling temperature; 0 decodes greedily.
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Sample from the k most likely tokens (0 = off).
        load_in_8bit: Load the weights in 8 bit with bitsandbytes (GPU or CPU).
        allow_cpu_offload: On a GPU, offload what does not fit to CPU RAM (device_map="auto"); ignored, with a
            message, on a machine without a GPU.
        dtype: Weight dtype; default bfloat16 on a GPU, float32 on the CPU.
        batch_size: Prompts per generate call for an instructions file.
        seed: Seed of the sampling; None leaves the RNG alone.
        stream: Print a single instruction's response token by token as it is generated.
    """
    if sum(x is not None for x in (instruction, instructions_file)) + chat != 1:
        raise ConfigError("give exactly one of --instruction, --instructions_file or --chat")
    checkpoint, kind = _checkpoint_from_flags(model, mode, base_model, sft_model, rlhf_model, model_name,
                                              adapter_path, merged_model_path, ppo_model_path, tokenizer_name)
    log.info("generate: loading %s (%s)", checkpoint.describe(), kind)
    loaded, tokenizer = load_checkpoint(checkpoint, dtype, load_in_8bit, allow_cpu_offload)
    template = PromptTemplate.load(checkpoint.template).bind(tokenizer)
    sampling = SamplingSpec(max_new_tokens, temperature, top_p, top_k)
    if seed is not None:
        torch.manual_seed(seed)
    if chat:
        return chat_loop(loaded, tokenizer, template, sampling, title=f"{checkpoint.describe()} ({kind})")
    if instruction is not None:
        records = [{"instruction": instruction, "input": input or "",
                    "prompt": template.render(instruction, input or "")}]
    else:
        records = read_instructions(instructions_file, template)
    prompts = [r.pop("prompt") for r in records]
    streamer = None
    if stream and len(prompts) == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generations = generate_responses(loaded, tokenizer, prompts, sampling, batch_size, streamer,
                                     progress="generate" if len(prompts) > batch_size else None,
                                     stop_ids=template.stop_token_ids())
    results = [{**r, "response": g.text} for r, g in zip(records, generations, strict=True)]
    if output_file:  # written before anything is printed: a printing error cannot lose the generations
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text("".join(json.dumps(r) + "\n" for r in results))
        log.info("generate: %d responses written to %s", len(results), output_file)
    if streamer is None:
        for i, r in enumerate(results):
            header = r["instruction"] + (f"\n[input] {r['input']}" if r["input"] else "")
            print(f"### {i + 1}. {header}\n{r['response']}\n" if len(results) > 1 else r["response"])
    return results


def _checkpoint_from_flags(model, mode, base_model, sft_model, rlhf_model, model_name, adapter_path,
                           merged_model_path, ppo_model_path, tokenizer_name) -> tuple[Checkpoint, str]:
    if model is not None:
        if any(x is not None for x in (mode, base_model, sft_model, rlhf_model, adapter_path, merged_model_path,
                                       ppo_model_path)):
            raise ConfigError("--model detects the stage itself: give it alone, or use --mode with the stage flags")
        return detect_checkpoint(model, tokenizer_name)
    rlhf_model = rlhf_model or ppo_model_path
    model_name = base_model or model_name
    if sft_model is not None:  # compare's --sft_model: merged folder or adapter folder
        if (Path(sft_model) / "adapter_config.json").is_file():
            adapter_path = sft_model
        else:
            merged_model_path = sft_model
    if mode is None:
        mode = ("rlhf" if rlhf_model else "sft" if (adapter_path or merged_model_path) else
                "base" if model_name else None)
        if mode is None:
            raise ConfigError("give --model PATH (any stage's output), or one of --base_model, --sft_model, "
                             "--rlhf_model")
    checkpoint = resolve_checkpoint(mode, model_name, adapter_path, merged_model_path, rlhf_model, tokenizer_name)
    return checkpoint, {"ppo": "rlhf"}.get(mode, mode)


def chat_loop(model, tokenizer, template: PromptTemplate, sampling: SamplingSpec, title: str = "",
              stream=None) -> list[dict]:
    """Reads user turns from `stream` (stdin), streams each answer; returns the conversation."""
    stream = stream or sys.stdin
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"chat with {title}; /reset forgets the conversation, /exit (or end of input) stops", flush=True)
    messages: list[dict] = []
    while True:
        print(">>> ", end="", flush=True)
        line = stream.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            print()
            return messages
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = []
            print("(conversation forgotten)")
            continue
        messages.append({"role": "user", "content": text})
        prompt = template.render_messages(messages)
        generation = generate_responses(model, tokenizer, [prompt], sampling, 1, streamer,
                                        stop_ids=template.stop_token_ids())[0]
        messages.append({"role": "assistant", "content": generation.text})
