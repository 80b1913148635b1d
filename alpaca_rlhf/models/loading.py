"""Loading: the only place that calls `from_pretrained`, quantizes and adds LoRA; plus the helpers every
stage uses on a loaded model (dropout off, the trainable tensors of a checkpoint, the reward model's stats)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
)

from alpaca_rlhf.models.gguf import gguf_folder
from alpaca_rlhf.models.specs import PAD_CANDIDATES, LoraSpec, ModelSpec, looks_local
from alpaca_rlhf.models.tiny import build_tiny_base

log = logging.getLogger(__name__)


def ensure_base(spec: ModelSpec) -> str:
    """The weights folder (or hub id) to load: builds the tiny base or converts a `.gguf` file on first use.

    A missing local folder (an earlier stage's output) is an error that says so, not the hub's "repo id"
    message."""
    if spec.tiny is None:
        for path in (spec.name_or_path, spec.tokenizer):
            if path and looks_local(path) and not Path(path).expanduser().exists():
                raise FileNotFoundError(
                    f"model folder {path!r} does not exist (working directory {os.getcwd()}). It is written by an "
                    "earlier stage: SFT or reward-model training then `alpaca-rlhf merge --adapter_path ...` "
                    "(see docs/recipe.md, the pipeline); run that first, or run from the folder that holds it.")
        if spec.name_or_path.endswith(".gguf"):
            return str(gguf_folder(spec, spec.name_or_path))
        return spec.name_or_path
    if not Path(spec.name_or_path, "config.json").is_file():
        if not looks_local(spec.name_or_path) or spec.name_or_path.endswith(".gguf"):
            raise FileNotFoundError(
                f"model {spec.name_or_path!r} is not a local folder, and the config's `tiny:` block builds a random "
                "tiny LLaMA only at a local folder of its own (e.g. output/tiny/base), never in place of a named "
                "model: to train that model, drop the block (--model.init_args.model.tiny null; for PPO "
                "--model.init_args.model.tiny null) and check the spelling of its name")
        try:
            build_tiny_base(spec.name_or_path, spec.tiny, spec.tiny_corpus, spec.tiny_vocab_size, spec.seed)
        except OSError:
            if not Path(spec.name_or_path, "config.json").is_file():  # another rank may have won the rename
                raise
    return spec.name_or_path


def ensure_pad_token(tokenizer, pad_token: str | None = None):
    """Sets the tokenizer's pad token by one documented rule and logs which token pads.

    `pad_token` ("eos" or a token of the vocabulary) wins. Otherwise: the tokenizer's own pad if it differs from
    EOS; else a reserved pad token it already has (Llama 3.1's `<|finetune_right_pad_id|>`); else its unk token;
    else EOS itself (Qwen2.5 ships pad == EOS and no unk). No new embedding rows are ever added.

    pad == EOS is safe in this project: every attention mask, label mask and response mask is built from
    positions (collators, `first_eos_mask`, the reward model's last-token index), never by comparing ids with
    the pad id, and a response's own EOS stays inside its mask. (A merged reward model scored by plain
    transformers' `AutoModelForSequenceClassification` pools the token before the first pad id, so there use
    `alpaca_rlhf.modules.reward.score`.)
    """
    name = getattr(tokenizer, "name_or_path", "?")
    if pad_token is not None:
        token = tokenizer.eos_token if pad_token == "eos" else pad_token
        if token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {pad_token!r} is not a token of tokenizer {name!r}")
        tokenizer.pad_token = token
        why = "configured"
    elif tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        why = "the tokenizer's own"
    else:
        vocab = tokenizer.get_vocab()
        candidates = [c for c in PAD_CANDIDATES if c in vocab]
        if tokenizer.unk_token is not None:
            candidates.append(tokenizer.unk_token)
        candidates = [c for c in candidates if vocab.get(c) != tokenizer.eos_token_id]
        tokenizer.pad_token = candidates[0] if candidates else tokenizer.eos_token
        why = "no distinct pad: EOS (masks are built from positions, so this is safe)" if not candidates \
            else "a reserved token"
    log.info("tokenizer %s pads with %r (id %s; %s)", name, tokenizer.pad_token, tokenizer.pad_token_id, why)
    return tokenizer


def load_tokenizer(spec: ModelSpec, padding_side: str = "right"):
    """The spec's tokenizer with its pad token chosen by `ensure_pad_token` and the given padding side."""
    path = ensure_base(spec)
    source = path if spec.tokenizer is None else spec.tokenizer
    if source.endswith(".gguf"):
        source = str(gguf_folder(spec, source))
    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side=padding_side, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    return ensure_pad_token(tokenizer, spec.pad_token)


@contextlib.contextmanager
def hub_errors(name: str):
    """A hub id that cannot be had (offline and not cached, or no such repository) stops with one message that
    names it and says what to do; transformers' own says neither (only "set 'local_files_only' to False")."""
    try:
        yield
    except OSError as e:
        if Path(name).exists():  # a local folder: the error is about what is in it, and says so
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = ("this machine is offline (HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache" if offline else
               "it could not be downloaded or found in the Hugging Face cache")
        raise FileNotFoundError(
            f"model {name!r} is not a local folder and {why}: give a local folder or a .gguf file, or download it "
            f"where there is network (`hf download {name}`) and run again; check the spelling of the id "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e


def quantization_config(spec: ModelSpec):
    if spec.quantization is None:
        return None

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=spec.torch_dtype, bnb_4bit_use_double_quant=True)


def _load(auto_cls, spec: ModelSpec, trainable: bool, **kwargs):
    path = ensure_base(spec)
    quant = quantization_config(spec)
    if quant is not None and torch.cuda.is_available():
        # quantized weights are placed at load time; Lightning's later .to() leaves them where they are
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    with hub_errors(path):
        model = auto_cls.from_pretrained(path, dtype=spec.torch_dtype, quantization_config=quant,
                                         revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs)
    if spec.quantization == "4bit":
        guard_cpu_4bit_kernel(model, trainable)
    if quant is not None and trainable:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif spec.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if trainable:
        model.config.use_cache = False
    else:
        model.requires_grad_(False)
        model.eval()
    return model


def guard_cpu_4bit_kernel(model: torch.nn.Module, trainable: bool) -> int:
    """Keeps bitsandbytes' CPU 4-bit inference repacking away from layers it breaks; returns how many.

    On CPUs with AVX512-bf16, bitsandbytes (0.50) repacks a `Linear4bit` weight for its inference kernel the
    first time the layer runs in eval mode without grad (validation, PPO's generation). From then on the layer's
    backward passes no gradient to its input, so LoRA adapters upstream of any 4-bit layer (q/v behind o_proj)
    silently stop learning; and the repacking fails unless the output size is a multiple of 32 and the input size
    one of the quantization block size (64; the tiny configs' 176-wide MLP and tiny test models). Trainable
    models never repack; frozen ones (a 4-bit reward model) keep the faster kernel where the shape allows.
    Nothing changes on a GPU.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and (trainable or not _cpu_kernel_fits(module)):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _cpu_kernel_fits(layer) -> bool:
    state = getattr(layer.weight, "quant_state", None)
    block = getattr(state, "blocksize", 64) or 64
    return layer.out_features % 32 == 0 and layer.in_features % block == 0


def unwrap_peft(model):
    """The model under a PEFT wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def neutral_generation_config(model) -> None:
    """Replaces the model's `generation_config` (from the checkpoint's generation_config.json) with one that keeps
    only the special token ids: `generate` fills unset fields from it, so a checkpoint's `min_p`, `typical_p`,
    `epsilon_cutoff`, `no_repeat_ngram_size` or `bad_words_ids` would otherwise truncate or bias sampling (and
    PPO's KL estimate with it)."""
    base = unwrap_peft(model)
    old = base.generation_config
    base.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                                              pad_token_id=old.pad_token_id)


def load_causal_lm(spec: ModelSpec, trainable: bool = True, **placement):
    """A causal LM per the spec; frozen and in eval mode unless `trainable`.

    `placement`: transformers' `device_map` / `offload_folder` for inference (training leaves placement to
    Lightning; quantized weights are placed here either way)."""
    return _load(AutoModelForCausalLM, spec, trainable, **placement)


def load_trunk(spec: ModelSpec, trainable: bool = True):
    """The bare decoder (`AutoModel`: no output layer or head) of any causal-LM or sequence-classifier folder."""
    return _load(AutoModel, spec, trainable)


def load_sequence_classifier(spec: ModelSpec, pad_token_id: int | None = None, trainable: bool = True):
    """A one-score sequence classifier; from a causal-LM folder its `score` head starts random."""
    kwargs = {"num_labels": 1}
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    return _load(AutoModelForSequenceClassification, spec, trainable, **kwargs)


def apply_lora(model, lora: LoraSpec, task_type: str = "CAUSAL_LM"):
    """Wraps the model with a fresh LoRA adapter (B = 0, so it starts as the identity)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, bias=lora.bias, task_type=task_type,
                        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None)
    return get_peft_model(model, config)


DROPOUT_ATTRIBUTES = ("attention_dropout", "hidden_dropout", "dropout", "resid_dropout", "embd_dropout")


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets every dropout probability to 0 (LoRA's included), so train() and eval() compute the same thing.

    Besides `nn.Dropout` modules, rates copied into modules at construction count too: LLaMA's attention keeps
    its own `attention_dropout` float and passes it to the attention kernel in train mode.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and hasattr(config, name):
            setattr(config, name, 0.0)


def trainable_state_dict(module: torch.nn.Module, state_dict: dict) -> dict:
    """The entries of `state_dict` that belong to trainable parameters (adapter-sized checkpoints)."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in keep}


def plain(value):
    """Dataclasses as dicts, containers recursively, and anything else non-primitive as its repr.

    Checkpoints keep hyperparameters this way so `torch.load(weights_only=True)` (torch's default) opens them.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def adapter_sized(module: torch.nn.Module, checkpoint: dict) -> None:
    """Keeps only trainable weights in a Lightning checkpoint, with hyperparameters in plain types."""
    checkpoint["state_dict"] = trainable_state_dict(module, checkpoint["state_dict"])
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = plain(dict(checkpoint["hyper_parameters"]))


REWARD_STATS_FILE = "reward_stats.json"


def read_reward_stats(path: str | os.PathLike) -> dict:
    """A reward model's `reward_stats.json` (score mean/std over held-out pairs); mean 0, std 1 if absent."""
    file = Path(path, REWARD_STATS_FILE)
    if not file.is_file():
        log.warning("%s has no %s: scores will not be centred", path, REWARD_STATS_FILE)
        return {"mean": 0.0, "std": 1.0, "n": 0, "split": None}
    return json.loads(file.read_text())


def load_reward_model(spec: ModelSpec):
    """(model, tokenizer, stats) of a merged reward model: frozen, in eval mode, 8/4-bit if the spec says so.

    The folder is what `python cli.py merge` writes from a reward adapter: a plain one-label sequence
    classifier (`pad_token_id` in its config) with `reward_stats.json` beside it. Score it with
    `alpaca_rlhf.modules.reward.score`, then centre with `stats["mean"]`.
    """
    tokenizer = load_tokenizer(spec)
    model = load_sequence_classifier(spec, pad_token_id=tokenizer.pad_token_id, trainable=False)
    return model, tokenizer, read_reward_stats(spec.name_or_path)
