"""Which weights a stage's output means, and loading them: a base folder or hub id, an SFT adapter or its merged
folder, a PPO export `step_<n>` on the merged SFT model named in its `ppo_state.json`."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.exports import (  # noqa: F401  (latest_export, resolve_base: re-exported, their old home)
    is_rl_output,
    latest_export,
    read_json,
    read_state,
    resolve_base,
    template_of,
)
from alpaca_rlhf.models import ModelSpec, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

MODES = ("base", "sft", "rlhf", "ppo")  # generate --mode (ppo: the seed's name for rlhf)
STAGES = ("base", "sft", "rlhf")  # compare's stages, in report order
STAGE_TITLES = {"base": "base", "sft": "SFT", "rlhf": "RLHF"}
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


def resolve_checkpoint(mode: str, model_name: str | None = None, adapter_path: str | None = None,
                       merged_model_path: str | None = None, ppo_model_path: str | None = None,
                       tokenizer_name: str | None = None) -> Checkpoint:
    """Maps the seed's inference flags to a `Checkpoint`, with a clear error for a missing or wrong one."""
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES}, got {mode!r}")
    mode = "rlhf" if mode == "ppo" else mode
    if mode == "base":
        if not model_name:
            raise ConfigError("--mode base needs --model_name (hub id or folder)")
        return Checkpoint(model_name, tokenizer=tokenizer_name)
    if mode == "sft":
        if merged_model_path:
            folder = Path(merged_model_path)
            return Checkpoint(merged_model_path, tokenizer=tokenizer_name, template=template_of(folder))
        if not adapter_path:
            raise ConfigError("--mode sft needs --merged_model_path, or --adapter_path (with --model_name to "
                             "override the adapter's recorded base)")
        folder = Path(adapter_path)
        config = read_json(folder / "adapter_config.json")
        if config is None:
            raise FileNotFoundError(f"{folder}: no adapter_config.json (is this a PEFT adapter folder?)")
        base = model_name or config["base_model_name_or_path"]
        tokenizer = tokenizer_name or (adapter_path if (folder / "tokenizer_config.json").is_file() else base)
        return Checkpoint(base, adapter_path, tokenizer, template_of(folder))
    if not ppo_model_path:
        raise ConfigError("--mode rlhf needs --rlhf_model (a PPO export step_<n>, or the PPO output_dir)")
    folder = latest_export(ppo_model_path)
    state = read_state(folder)
    adapter_config = read_json(folder / "adapter_config.json")
    recorded = (state or {}).get("base_model") or adapter_config["base_model_name_or_path"]
    base = model_name or resolve_base(recorded, folder)
    tokenizer = tokenizer_name or (str(folder) if (folder / "tokenizer_config.json").is_file() else base)
    return Checkpoint(base, str(folder), tokenizer, template_of(folder), state)


def detect_checkpoint(path: str, tokenizer_name: str | None = None) -> tuple[Checkpoint, str]:
    """(Checkpoint, kind) of any stage's output from one path: a PPO export or output_dir ("rlhf"), a PEFT
    adapter folder ("sft", on its recorded base), a merged or base folder or a hub id ("model")."""
    folder = Path(path)
    if is_rl_output(folder):
        return resolve_checkpoint("rlhf", ppo_model_path=path, tokenizer_name=tokenizer_name), "rlhf"
    if (folder / "adapter_config.json").is_file():
        return resolve_checkpoint("sft", adapter_path=path, tokenizer_name=tokenizer_name), "adapter"
    config = read_json(folder / "config.json")
    if config and any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise ConfigError(f"{path}: a reward model (sequence classifier); it scores responses, it does not generate")
    if folder.is_dir() and config is None and not str(path).endswith(".gguf"):
        raise FileNotFoundError(f"{path}: no config.json, adapter_config.json or ppo_state.json (is this a "
                                "model folder or a stage's output?)")
    template = template_of(folder) if folder.is_dir() else "alpaca"
    return Checkpoint(path, tokenizer=tokenizer_name, template=template), "model"


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

