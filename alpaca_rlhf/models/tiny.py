"""The tiny random LLaMA every CPU test and the embedded default use: a config dict, random weights and a
byte-level BPE tokenizer trained on the bundled sample, saved as a real folder that `from_pretrained` loads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alpaca_rlhf.data.records import read_raw_records
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.io import atomic_dir
from alpaca_rlhf.models.specs import TINY_CORPUS, TINY_LLAMA

log = logging.getLogger(__name__)


def _corpus_texts(corpus: str) -> list[str]:
    template = PromptTemplate.load("alpaca")
    texts = []
    for r in read_raw_records(corpus):
        texts.append(template.render(r.get("instruction", ""), r.get("input", "")) + r.get("output", ""))
    return texts


def train_tiny_tokenizer(corpus: str = TINY_CORPUS, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained locally on Alpaca-format records; BOS is added, EOS is not."""
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
