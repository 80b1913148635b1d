"""The model factory: the only place that calls `from_pretrained`, quantizes, adds LoRA and merges.

Every stage describes its models with a `ModelSpec` (which weights, dtype, quantization, checkpointing) and a
`LoraSpec`, both plain dataclasses that LightningCLI fills from YAML. A spec with `tiny` set builds a random
LLaMA from that config dict (and a byte-level BPE tokenizer trained on the bundled sample) the first time,
saving it as a real folder so that every later stage, adapter and merge loads it with `from_pretrained`.

One module a concern: `specs` (what a config says), `tiny` (the random test model), `gguf` (llama.cpp files),
`loading` (from_pretrained, quantization, LoRA) and `merge` (an adapter folded into its base). Every name is
imported here, so `from alpaca_rlhf.models import X` works for all of them.
"""

from alpaca_rlhf.exports import MERGED_FROM_FILE, STATE_FILE, export_adapter, merged_folder, resolve_base
from alpaca_rlhf.models.gguf import (
    CONVERTER_VERSION,
    FINGERPRINT_BYTES,
    MISSING_PRE_TOKENIZERS,
    READ_PRE_TOKENIZERS,
    convert_gguf,
    gguf_cache_dir,
    gguf_fingerprint,
    gguf_folder,
    gguf_pre_tokenizer,
    restore_pre_tokenizer,
)
from alpaca_rlhf.models.loading import (
    DROPOUT_ATTRIBUTES,
    REWARD_STATS_FILE,
    adapter_sized,
    apply_lora,
    disable_dropout,
    ensure_base,
    ensure_pad_token,
    guard_cpu_4bit_kernel,
    hub_errors,
    load_causal_lm,
    load_reward_model,
    load_sequence_classifier,
    load_tokenizer,
    load_trunk,
    neutral_generation_config,
    plain,
    quantization_config,
    read_reward_stats,
    trainable_state_dict,
    unwrap_peft,
)
from alpaca_rlhf.models.merge import (
    merge_adapter,
    untie_output_embeddings,
)
from alpaca_rlhf.models.specs import (
    DTYPES,
    OUTPUT_ROOTS,
    PAD_CANDIDATES,
    TINY_CORPUS,
    TINY_LLAMA,
    LoraSpec,
    ModelSpec,
    SamplingSpec,
    looks_local,
    null_to_none,
    touches_output_layer,
)
from alpaca_rlhf.models.tiny import (
    _corpus_texts,
    build_tiny_base,
    train_tiny_tokenizer,
)

__all__ = [
    "SamplingSpec",
    "MERGED_FROM_FILE",
    "STATE_FILE",
    "export_adapter",
    "merged_folder",
    "resolve_base",
    "CONVERTER_VERSION",
    "FINGERPRINT_BYTES",
    "MISSING_PRE_TOKENIZERS",
    "READ_PRE_TOKENIZERS",
    "convert_gguf",
    "gguf_cache_dir",
    "gguf_fingerprint",
    "gguf_folder",
    "gguf_pre_tokenizer",
    "restore_pre_tokenizer",
    "DROPOUT_ATTRIBUTES",
    "REWARD_STATS_FILE",
    "adapter_sized",
    "apply_lora",
    "disable_dropout",
    "ensure_base",
    "ensure_pad_token",
    "guard_cpu_4bit_kernel",
    "hub_errors",
    "load_causal_lm",
    "load_reward_model",
    "load_sequence_classifier",
    "load_tokenizer",
    "load_trunk",
    "neutral_generation_config",
    "plain",
    "quantization_config",
    "read_reward_stats",
    "trainable_state_dict",
    "unwrap_peft",
    "merge_adapter",
    "untie_output_embeddings",
    "DTYPES",
    "OUTPUT_ROOTS",
    "PAD_CANDIDATES",
    "TINY_CORPUS",
    "TINY_LLAMA",
    "LoraSpec",
    "ModelSpec",
    "looks_local",
    "null_to_none",
    "touches_output_layer",
    "_corpus_texts",
    "build_tiny_base",
    "train_tiny_tokenizer",
]
