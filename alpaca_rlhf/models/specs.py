"""What a stage says about its models: `ModelSpec` (which weights, dtype, quantization, checkpointing) and
`LoraSpec`, plain dataclasses LightningCLI fills from YAML, and the rules for reading a model name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# tokens a tokenizer may reserve for padding (Llama 3.1 ships <|finetune_right_pad_id|>); never EOS
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|reserved_special_token_0|>")


# the tiny LLaMA's defaults; a config's `tiny:` dict overrides any of them
TINY_LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


TINY_CORPUS = "alpaca_rlhf/data/samples/alpaca_sample.json"


@dataclass
class LoraSpec:
    """LoRA adapter settings (PEFT `LoraConfig`).

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by alpha / r.
        dropout: Dropout on the adapter's input during training.
        target_modules: Names of the linear layers that get adapters, or "all-linear" (every linear layer
            but the output layer; TRL's "LoRA Without Regret" advice for small ranks and RL).
        bias: Which biases train: "none", "all" or "lora_only".
        modules_to_save: Modules trained in full and saved with the adapter (e.g. `lm_head` for a tiny random
            base); the reward model's `score` head is added for you.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    modules_to_save: list[str] | None = None


@dataclass
class ModelSpec:
    """Which weights to load and how.

    Attributes:
        name_or_path: Hub id (e.g. `meta-llama/Llama-3.1-8B`), local folder, or a local `.gguf` file: that is
            dequantized once into an ordinary Hugging Face folder (safetensors + tokenizer) under `gguf_cache`,
            which every later load, adapter and merge uses.
        tokenizer: Tokenizer hub id or folder; defaults to `name_or_path`.
        pad_token: The token to pad with (a token string of the vocabulary, or "eos"); None = the rule of
            `ensure_pad_token`: the tokenizer's own pad if distinct from EOS, else a reserved pad token, else
            unk, else EOS (safe: every mask here is built from positions, never from pad ids).
        revision: Hub revision (branch, tag or commit) of `name_or_path`.
        trust_remote_code: Allow a hub model's own Python code (off by default: it runs code from the hub).
        attn_implementation: transformers attention kernel: "eager", "sdpa", "flash_attention_2"; None = default.
        gguf_cache: Where `.gguf` files are converted to; None = `$ALPACA_RLHF_CACHE/gguf` or
            `~/.cache/alpaca_rlhf/gguf`.
        dtype: Weight dtype: float32, bfloat16 or float16.
        quantization: None, "8bit" or "4bit" (bitsandbytes). Frozen weights only; adapters stay in `dtype`.
        bnb_4bit_quant_type: "nf4" or "fp4" for 4-bit loading.
        gradient_checkpointing: Recompute activations in backward to save memory.
        tiny: If set and `name_or_path` does not exist yet, build a random-weight LLaMA there from this config
            dict (keys of `transformers.LlamaConfig`; unset keys take small defaults) with a tokenizer trained on
            `tiny_corpus`. Nothing is downloaded.
        tiny_corpus: Alpaca-format JSON the tiny tokenizer is trained on.
        tiny_vocab_size: Vocabulary size of the tiny tokenizer.
        seed: Seed of the tiny model's random weights.
    """

    name_or_path: str = "meta-llama/Llama-3.1-8B"
    tokenizer: str | None = None
    pad_token: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gguf_cache: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"
    quantization: str | None = None  # null, "8bit" or "4bit" (a Literal | None refuses null on the command line)
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    gradient_checkpointing: bool = False
    tiny: dict | None = None
    tiny_corpus: str = TINY_CORPUS
    tiny_vocab_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        self.quantization = null_to_none(self.quantization)  # `--...quantization null` arrives as "None"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"quantization must be null, '8bit' or '4bit', got {self.quantization!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


OUTPUT_ROOTS = ("output",)  # where stages write: a path under one is a local folder, never a hub id


def looks_local(name_or_path: str) -> bool:
    """A folder or file path rather than a hub id ("org/name"): it exists, starts with `.`, `/` or `~`, has more
    than one slash, ends in `.gguf`, or sits under a known output root (`output/lora-alpaca-adapter-merged`)."""
    path = Path(name_or_path).expanduser()
    return (path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
            or name_or_path.endswith(".gguf") or path.parts[:1] in [(root,) for root in OUTPUT_ROOTS]
            or (os.sep != "/" and os.sep in name_or_path))


def null_to_none(value):
    """None for the spellings of "no value" a command line or YAML hands over as text ("None", "null", "")."""
    return None if value in ("None", "null", "none", "") else value


def touches_output_layer(peft_config) -> bool:
    """Whether a LoRA config (PEFT's or a `LoraSpec`) puts an adapter or a trained copy on the output layer."""
    names = []
    for value in (peft_config.target_modules, getattr(peft_config, "modules_to_save", None)):
        names += [value] if isinstance(value, str) else list(value or [])
    return any(n == "lm_head" or n.endswith(".lm_head") for n in names)


@dataclass
class SamplingSpec:
    """Decoding settings, always passed explicitly so no checkpoint's generation_config.json changes them. `compare`
    and `generate` take them as they are; the online stages' rollout sampling (`GenerationHParams`) extends them.

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

    def generation_config(self, tokenizer, stop_ids: list[int] | None = None):
        """The GenerationConfig; generation stops at any of `stop_ids` (default: EOS)."""
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**(sampling if self.temperature > 0 else {"do_sample": False}),
                                max_new_tokens=self.max_new_tokens, num_beams=1, repetition_penalty=1.0,
                                eos_token_id=list(stop_ids or [tokenizer.eos_token_id]),
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                use_cache=True)
