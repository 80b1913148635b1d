"""The model factory: the only place that calls `from_pretrained`, quantizes, adds LoRA and merges.

Every stage describes its models with a `ModelSpec` (which weights, dtype, quantization, checkpointing) and a
`LoraSpec`, both plain dataclasses that LightningCLI fills from YAML. A spec with `tiny` set builds a random
LLaMA from that config dict (and a byte-level BPE tokenizer trained on the bundled sample) the first time,
saving it as a real folder so that every later stage, adapter and merge loads it with `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alpaca_rlhf.io import atomic_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# tokens a tokenizer may reserve for padding (Llama 3.1 ships <|finetune_right_pad_id|>); never EOS
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|reserved_special_token_0|>")
TINY_CORPUS = "alpaca_rlhf/data/samples/alpaca_sample.json"
# the tiny LLaMA's defaults; a config's `tiny:` dict overrides any of them
TINY_LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


@dataclass
class LoraSpec:
    """LoRA adapter settings (PEFT `LoraConfig`).

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by alpha / r.
        dropout: Dropout on the adapter's input during training.
        target_modules: Names of the linear layers that get adapters.
        bias: Which biases train: "none", "all" or "lora_only".
        modules_to_save: Modules trained in full and saved with the adapter (e.g. `lm_head` for a tiny random
            base); the reward model's `score` head is added for you.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    modules_to_save: list[str] | None = None


@dataclass
class ModelSpec:
    """Which weights to load and how.

    Attributes:
        name_or_path: Hub id (e.g. `meta-llama/Llama-3.1-8B`) or local folder.
        tokenizer: Tokenizer hub id or folder; defaults to `name_or_path`.
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
    dtype: str = "float32"
    quantization: str | None = None
    bnb_4bit_quant_type: str = "nf4"
    gradient_checkpointing: bool = False
    tiny: dict | None = None
    tiny_corpus: str = TINY_CORPUS
    tiny_vocab_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"quantization must be null, '8bit' or '4bit', got {self.quantization!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _corpus_texts(corpus: str) -> list[str]:
    from alpaca_rlhf.data.records import read_raw_records
    from alpaca_rlhf.data.templates import PromptTemplate

    template = PromptTemplate.load("alpaca")
    texts = []
    for r in read_raw_records(corpus):
        texts.append(template.render(r.get("instruction", ""), r.get("input", "")) + r.get("output", ""))
    return texts


def train_tiny_tokenizer(corpus: str = TINY_CORPUS, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained locally on Alpaca-format records; BOS is added, EOS is not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_texts(corpus), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", model_max_length=1024)


def build_tiny_base(path: str | os.PathLike, config: dict | None = None, corpus: str = TINY_CORPUS,
                    vocab_size: int = 1024, seed: int = 0) -> Path:
    """Saves a random-weight LLaMA and its locally trained tokenizer as a `from_pretrained` folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(corpus, vocab_size)
    cfg = LlamaConfig(**{**TINY_LLAMA, **(config or {}), "vocab_size": len(tokenizer),
                         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id})
    with torch.random.fork_rng(devices=[]):  # the global RNG (LoRA init after this) is left as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("built tiny LLaMA (%d parameters) at %s", model.num_parameters(), path)
    return Path(path)


def looks_local(name_or_path: str) -> bool:
    """A folder path rather than a hub id ("org/name"): ./x, ../x, /x, ~/x, or a/b/c."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep != "/" and \
        os.sep in name_or_path


def ensure_base(spec: ModelSpec) -> None:
    """Builds the tiny base folder if the spec asks for one and it is not there yet; a missing local folder
    (an earlier stage's output) is an error that says so, not the hub's "repo id" message."""
    if spec.tiny is None:
        for path in (spec.name_or_path, spec.tokenizer):
            if path and looks_local(path) and not Path(path).expanduser().exists():
                raise FileNotFoundError(
                    f"model folder {path!r} does not exist (working directory {os.getcwd()}). It is written by an "
                    "earlier stage: SFT or reward-model training then `python cli.py merge --adapter_path ...` "
                    "(see README: the pipeline); run that first, or run from the folder that holds it.")
        return
    if not Path(spec.name_or_path, "config.json").is_file():
        try:
            build_tiny_base(spec.name_or_path, spec.tiny, spec.tiny_corpus, spec.tiny_vocab_size, spec.seed)
        except OSError:
            if not Path(spec.name_or_path, "config.json").is_file():  # another rank may have won the rename
                raise


def ensure_pad_token(tokenizer):
    """Gives the tokenizer a pad token distinct from EOS, from tokens it already has (no new embedding rows)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return tokenizer
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return tokenizer
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path!r} has no token to pad with other than EOS; add one and resize the "
        "model's embeddings first (pad == EOS breaks the masks that find the end of a response)"
    )


def load_tokenizer(spec: ModelSpec, padding_side: str = "right"):
    """The spec's tokenizer with a distinct pad token and the given padding side."""
    from transformers import AutoTokenizer

    ensure_base(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.name_or_path, padding_side=padding_side)
    return ensure_pad_token(tokenizer)


def quantization_config(spec: ModelSpec):
    if spec.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=spec.torch_dtype, bnb_4bit_use_double_quant=True)


def _load(auto_cls, spec: ModelSpec, trainable: bool, **kwargs):
    ensure_base(spec)
    quant = quantization_config(spec)
    if quant is not None and torch.cuda.is_available():
        # quantized weights are placed at load time; Lightning's later .to() leaves them where they are
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = auto_cls.from_pretrained(spec.name_or_path, dtype=spec.torch_dtype, quantization_config=quant,
                                     **kwargs)
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


def load_causal_lm(spec: ModelSpec, trainable: bool = True, **placement):
    """A causal LM per the spec; frozen and in eval mode unless `trainable`.

    `placement`: transformers' `device_map` / `offload_folder` for inference (training leaves placement to
    Lightning; quantized weights are placed here either way)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, spec, trainable, **placement)


def load_trunk(spec: ModelSpec, trainable: bool = True):
    """The bare decoder (`AutoModel`: no output layer or head) of any causal-LM or sequence-classifier folder."""
    from transformers import AutoModel

    return _load(AutoModel, spec, trainable)


def load_sequence_classifier(spec: ModelSpec, pad_token_id: int | None = None, trainable: bool = True):
    """A one-score sequence classifier; from a causal-LM folder its `score` head starts random."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": 1}
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    return _load(AutoModelForSequenceClassification, spec, trainable, **kwargs)


def apply_lora(model, lora: LoraSpec, task_type: str = "CAUSAL_LM"):
    """Wraps the model with a fresh LoRA adapter (B = 0, so it starts as the identity)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias=lora.bias, task_type=task_type,
                        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None)
    return get_peft_model(model, config)


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets every dropout probability to 0 (LoRA's included), so train() and eval() compute the same thing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
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
    import dataclasses

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


def export_adapter(peft_model, tokenizer, output_dir: str | os.PathLike, extra_files: dict | None = None) -> Path:
    """Saves the adapter in PEFT's format, the tokenizer and extra JSON files, whole or not at all."""
    with atomic_dir(output_dir) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            Path(tmp, name).write_text(json.dumps(content, indent=2))
    return Path(output_dir)


def resolve_base(base: str, adapter: Path) -> str:
    """The adapter's recorded base: as given if it exists (or is a hub id), else a relative folder found from an
    ancestor of the adapter (a run started in another working directory records `output/tiny/base`)."""
    if Path(base).exists() or Path(base).is_absolute():
        return base
    for parent in Path(adapter).resolve().parents:
        if (parent / base / "config.json").is_file():
            return str(parent / base)
    return base


def merge_adapter(adapter_path: str, output_dir: str | None = None, dtype: str = "float32",
                  base_model: str | None = None) -> Path:
    """Folds a LoRA adapter into its base and saves a standalone checkpoint plain `transformers` loads.

    The base is loaded unquantized in `dtype`. A sequence-classification adapter (the reward model's) keeps its
    trained `score` head. Tokenizer, template and any JSON side files of the adapter folder are copied along.

    Args:
        adapter_path: Folder with `adapter_config.json` and `adapter_model.safetensors`.
        output_dir: Where to write; defaults to `<adapter_path>-adapter-merged`.
        dtype: float32, bfloat16 or float16 (never quantized: merging into quantized weights loses precision).
        base_model: Override the adapter's recorded base (hub id or folder).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter = Path(adapter_path)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json (is this a PEFT adapter folder?)")
    output = Path(output_dir) if output_dir else adapter.with_name(adapter.name + "-adapter-merged")
    config = PeftConfig.from_pretrained(str(adapter))
    base = base_model or resolve_base(config.base_model_name_or_path, adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if (adapter / "tokenizer_config.json").exists() else base)
    task = str(getattr(config, "task_type", "CAUSAL_LM"))
    if task.endswith("SEQ_CLS"):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=DTYPES[dtype],
                                                                   pad_token_id=tokenizer.pad_token_id)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for side_file in adapter.glob("*.json"):
            if side_file.name not in {"adapter_config.json"} and not (tmp / side_file.name).exists():
                shutil.copy(side_file, tmp / side_file.name)
    log.info("merged %s into %s -> %s", adapter, base, output)
    return output


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
