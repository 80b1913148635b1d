"""A `.gguf` file (llama.cpp's format) as a Hugging Face folder: converted once into a cache keyed by the file's
fingerprint, with the pre-tokenizer the file declares restored."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alpaca_rlhf.io import atomic_dir
from alpaca_rlhf.models.specs import ModelSpec

log = logging.getLogger(__name__)


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
