"""The model factory: the only place that calls `from_pretrained`, quantizes, adds LoRA and merges.

Every stage describes its models with a `ModelSpec` (which weights, dtype, quantization, checkpointing) and a
`LoraSpec`, both plain dataclasses that LightningCLI fills from YAML. A spec with `tiny` set builds a random
LLaMA from that config dict (and a byte-level BPE tokenizer trained on the bundled sample) the first time,
saving it as a real folder so that every later stage, adapter and merge loads it with `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from alpaca_rlhf.exports import MERGED_FROM_FILE, STATE_FILE, export_adapter, merged_folder, resolve_base  # noqa: F401
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


OUTPUT_ROOTS = ("output",)  # where stages write: a path under one is a local folder, never a hub id


def looks_local(name_or_path: str) -> bool:
    """A folder or file path rather than a hub id ("org/name"): it exists, starts with `.`, `/` or `~`, has more
    than one slash, ends in `.gguf`, or sits under a known output root (`output/lora-alpaca-adapter-merged`)."""
    path = Path(name_or_path).expanduser()
    return (path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
            or name_or_path.endswith(".gguf") or path.parts[:1] in [(root,) for root in OUTPUT_ROOTS]
            or (os.sep != "/" and os.sep in name_or_path))


def gguf_cache_dir(spec: ModelSpec) -> Path:
    if spec.gguf_cache:
        return Path(spec.gguf_cache).expanduser()
    root = os.environ.get("ALPACA_RLHF_CACHE") or Path.home() / ".cache" / "alpaca_rlhf"
    return Path(root) / "gguf"


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Dequantizes a GGUF checkpoint into an ordinary Hugging Face folder (fp32 safetensors, config, tokenizer).

    transformers reads GGUF (with the `gguf` package) but refuses to save such a model, and its config keeps
    a `quantization_config` naming the GGUF file; so the weights go into a plain model of the same config,
    without that entry. Written whole or not at all, so an interrupted conversion is redone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as e:
        raise ImportError(f"reading {gguf_path.name} needs the `gguf` package: pip install gguf") from e
    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("dequantizing %s into %s (once; later runs reuse the folder)", gguf_path, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    restore_pre_tokenizer(tokenizer, gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "converted_from.json").write_text(json.dumps(
            {"gguf_file": str(gguf_path), "size": gguf_path.stat().st_size, "fingerprint": gguf_fingerprint(gguf_path),
             "converter": CONVERTER_VERSION},
            indent=2))
    return Path(output_dir)


FINGERPRINT_BYTES = 8 << 20
CONVERTER_VERSION = 2  # 2: the declared pre-tokenizer restored (a folder converted by an older version is redone)


def gguf_fingerprint(path: str | os.PathLike) -> str:
    """A content key of a GGUF file: sha256 of its size, its first 8 MiB (the header: metadata, tokenizer,
    tensor table) and its last 8 MiB (tensor data); ~20 ms where a whole-file hash of 500 MB takes seconds."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


# GGUF pre-tokenizer names (`tokenizer.ggml.pre`) whose rule transformers' GGUF reader leaves out, and the rule
# (llama.cpp's own: SmolLM splits every digit before the byte-level split)
def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


MISSING_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}
# names transformers reproduces itself (checked: the converted tokenizer's pre-tokenizer is the file's rule)
READ_PRE_TOKENIZERS = {"default", "gpt2", "llama-bpe", "llama3", "qwen2"}


def gguf_pre_tokenizer(gguf_path: str | os.PathLike) -> str | None:
    """The GGUF file's declared pre-tokenizer (`tokenizer.ggml.pre`), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def restore_pre_tokenizer(tokenizer, gguf_path: str | os.PathLike) -> str | None:
    """Puts back the pre-tokenizer a GGUF file declares where transformers drops it (SmolLM2's `smollm` splits
    digits one by one: without it 397 of 5,000 Alpaca records tokenize differently and score 5.2 nats worse each);
    warns when the declared one is neither restored here nor known to be read. Returns the declared name."""
    pre = gguf_pre_tokenizer(gguf_path)
    if pre in MISSING_PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = MISSING_PRE_TOKENIZERS[pre]()
    elif pre is not None and pre not in READ_PRE_TOKENIZERS:
        log.warning("%s declares the pre-tokenizer %r, which transformers' GGUF reader may not reproduce: its "
                    "tokenization can differ from the original model's (compare with the model's own "
                    "tokenizer.json if you have it)", gguf_path, pre)
    return pre


def gguf_folder(spec: ModelSpec, gguf_path: str) -> Path:
    """The converted folder of a `.gguf` spec, converting it on first use and again whenever the file's content
    differs from the one converted (another file of the same name, even of the same size)."""
    path = Path(gguf_path).expanduser()
    folder = gguf_cache_dir(spec) / path.stem
    record = folder / "converted_from.json"
    if record.is_file():  # converted before: reuse it unless the .gguf file changed
        recorded = json.loads(record.read_text())
        if not path.is_file() or (recorded.get("fingerprint") == gguf_fingerprint(path)
                                  and recorded.get("converter") == CONVERTER_VERSION):
            return folder
        log.info("%s differs from the file converted into %s: converting it again", path, folder)
    try:
        convert_gguf(path, folder)
    except OSError:
        if not record.is_file():  # another process may have won the rename
            raise
    return folder


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
                    "(see README: the pipeline); run that first, or run from the folder that holds it.")
        if spec.name_or_path.endswith(".gguf"):
            return str(gguf_folder(spec, spec.name_or_path))
        return spec.name_or_path
    if not Path(spec.name_or_path, "config.json").is_file():
        if not looks_local(spec.name_or_path) or spec.name_or_path.endswith(".gguf"):
            raise FileNotFoundError(
                f"model {spec.name_or_path!r} is not a local folder, and the config's `tiny:` block builds a random "
                "tiny LLaMA only at a local folder of its own (e.g. output/tiny/base), never in place of a named "
                "model: to train that model, drop the block (--model.init_args.model.tiny null; for PPO "
                "--model.init_args.policy.tiny null) and check the spelling of its name")
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
    from transformers import AutoTokenizer

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
    from transformers import BitsAndBytesConfig

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


def null_to_none(value):
    """None for the spellings of "no value" a command line or YAML hands over as text ("None", "null", "")."""
    return None if value in ("None", "null", "none", "") else value


def neutral_generation_config(model) -> None:
    """Replaces the model's `generation_config` (from the checkpoint's generation_config.json) with one that keeps
    only the special token ids: `generate` fills unset fields from it, so a checkpoint's `min_p`, `typical_p`,
    `epsilon_cutoff`, `no_repeat_ngram_size` or `bad_words_ids` would otherwise truncate or bias sampling (and
    PPO's KL estimate with it)."""
    from transformers import GenerationConfig

    base = unwrap_peft(model)
    old = base.generation_config
    base.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                                              pad_token_id=old.pad_token_id)


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
    output = Path(output_dir) if output_dir else Path(merged_folder(adapter))
    config = PeftConfig.from_pretrained(str(adapter))
    base = base_model or resolve_base(config.base_model_name_or_path, adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if (adapter / "tokenizer_config.json").exists() else base)
    task = str(getattr(config, "task_type", "CAUSAL_LM"))
    started = time.perf_counter()
    log.info("merge: loading the base %s (%s, %s)", base, dtype, "reward model" if task.endswith("SEQ_CLS") else
             "causal LM")
    if task.endswith("SEQ_CLS"):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=DTYPES[dtype],
                                                                   pad_token_id=tokenizer.pad_token_id)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
    if touches_output_layer(config):
        untie_output_embeddings(model)
    log.info("merge: folding the adapter %s in", adapter)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    log.info("merge: writing %s", output)
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for side_file in adapter.glob("*.json"):
            if side_file.name in {"adapter_config.json", STATE_FILE} or (tmp / side_file.name).exists():
                continue  # an RL export's state file would make the merged folder read as an RL run
            shutil.copy(side_file, tmp / side_file.name)
        state = adapter / STATE_FILE
        if state.is_file():  # its provenance stays, under a name no reader takes for an RL run
            (tmp / MERGED_FROM_FILE).write_text(json.dumps({"adapter": str(adapter), "base": str(base),
                                                            STATE_FILE: json.loads(state.read_text())}, indent=2))
    log.info("merge: %s folded into %s -> %s in %.0f s", adapter, base, output, time.perf_counter() - started)
    return output


def touches_output_layer(peft_config) -> bool:
    """Whether a LoRA config (PEFT's or a `LoraSpec`) puts an adapter or a trained copy on the output layer."""
    names = []
    for value in (peft_config.target_modules, getattr(peft_config, "modules_to_save", None)):
        names += [value] if isinstance(value, str) else list(value or [])
    return any(n == "lm_head" or n.endswith(".lm_head") for n in names)


def untie_output_embeddings(model) -> bool:
    """Gives the output layer its own copy of a matrix it shares with the input embeddings; True if it did.

    SmolLM2 and many small models tie the two. Merging a LoRA on `lm_head` (or saving a trained `lm_head` from
    `modules_to_save`) into a tied model would write into the shared matrix and change the input embeddings
    too, so merged and base + adapter logits would differ. Untied, the merge is exact and the saved config says
    `tie_word_embeddings: false`.
    """
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


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
