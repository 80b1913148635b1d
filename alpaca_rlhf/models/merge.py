"""Merging: a LoRA adapter folded into its base and written as a standalone checkpoint plain `transformers`
loads."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alpaca_rlhf.exports import MERGED_FROM_FILE, STATE_FILE, merged_folder, resolve_base
from alpaca_rlhf.io import atomic_dir
from alpaca_rlhf.models.specs import DTYPES, touches_output_layer

log = logging.getLogger(__name__)


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
