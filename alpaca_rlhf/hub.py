"""`alpaca-rlhf push`: an adapter or merged folder to the Hugging Face Hub (or a local folder), with a model card.

    alpaca-rlhf push --folder output/lora-alpaca --to my-name/llama-3.1-8b-alpaca-lora
    alpaca-rlhf push --folder output/ppo_checkpoints/step_24-adapter-merged --to my-name/alpaca-rlhf-ppo --private
    alpaca-rlhf push --folder output/tiny/lora-alpaca --to /srv/models/tiny-sft     # a local folder: a copy

The folder is checked first (a PEFT adapter with its weights, or a model with `config.json` and weights), and a
model card (`README.md`: base model, what the stage is, the files) is written beside the files unless the folder has
one of its own (PEFT's blank template is replaced). A hub id goes through `huggingface_hub` (`create_repo`, then
`upload_folder`; log in with `hf auth login` or `HF_TOKEN`); a path (absolute, or starting with `.` or `file://`)
gets a copy written whole or not at all, the same files the hub would get, for a mirror or a test without network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alpaca_rlhf import exports
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.io import atomic_dir

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
           "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe_folder(folder: Path) -> dict:
    """What the folder holds, for the card: kind (adapter / model / reward model), base model, stage."""
    if not folder.is_dir():
        raise ConfigError(f"push: {folder} is not a folder (give an adapter folder or a merged model folder)")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise ConfigError(f"push: {folder} has no weights ({', '.join(WEIGHTS[:3])}, ...): give a finished "
                          "adapter (a stage's adapter_dir or a step_<n> export) or a merged folder")
    adapter = _read(folder / "adapter_config.json")
    config = _read(folder / "config.json")
    if not adapter and not config:
        raise ConfigError(f"push: {folder} has neither adapter_config.json nor config.json: not a model folder")
    architectures = config.get("architectures") or []
    reward = adapter.get("task_type") == "SEQ_CLS" or any(a.endswith("ForSequenceClassification")
                                                          for a in architectures)
    merged_from = _read(folder / exports.MERGED_FROM_FILE)
    rl = (folder / exports.STATE_FILE).is_file() or bool(merged_from.get(exports.STATE_FILE))
    stage = "reward model" if reward else "RLHF policy" if rl else "instruction-tuned (SFT) model"
    base = adapter.get("base_model_name_or_path") or merged_from.get("base") or config.get("_name_or_path")
    return {"kind": "adapter" if adapter else "model", "stage": stage, "base": base, "reward": reward}


def model_card(folder: Path, info: dict) -> str:
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    front = ["---", "library_name: " + ("peft" if info["kind"] == "adapter" else "transformers"),
             "tags: [alpaca-rlhf, " + ("lora, " if info["kind"] == "adapter" else "") +
             ("reward-model" if info["reward"] else "rlhf" if info["stage"] == "RLHF policy" else "sft") + "]"]
    if info["base"] and not str(info["base"]).startswith((".", "/", "output")):
        front.append(f"base_model: {info['base']}")
    front.append("---")
    load = (f"`PeftModel.from_pretrained(base, '<this repo>')` on `{info['base']}`" if info["kind"] == "adapter"
            else "`AutoModelForSequenceClassification.from_pretrained('<this repo>')`" if info["reward"]
            else "`AutoModelForCausalLM.from_pretrained('<this repo>')`")
    return "\n".join([*front, "", f"# {folder.name}", "",
                      f"A {'LoRA adapter' if info['kind'] == 'adapter' else 'merged model'}: the {info['stage']} "
                      f"of the alpaca-rlhf recipe (SFT -> reward model -> PPO/RLOO/GRPO/DPO with LoRA).", "",
                      f"- base model: {info['base'] or 'see config.json'}", f"- load it with {load}",
                      f"- files: {', '.join(files)}", ""])


def _is_local(target: str) -> bool:
    return target.startswith(("/", ".", "~", "file://"))


def push(folder: str, to: str, private: bool = False, message: str = "Upload with alpaca-rlhf push",
         overwrite: bool = False) -> str:
    """Uploads an adapter or merged folder to the Hugging Face Hub (or copies it to a local folder) with a model
    card.

    Args:
        folder: The adapter folder (a stage's adapter_dir, a step_<n> export) or a merged model folder.
        to: A hub repository id (`name/repo`), or a local path (absolute, `./...`, `~/...` or `file://...`).
        private: Create the hub repository private.
        message: The hub commit message.
        overwrite: Replace a local target folder that exists.
    """
    source = Path(folder)
    info = describe_folder(source)
    readme = source / "README.md"
    own_card = readme.is_file() and "# Model Card for Model ID" not in readme.read_text(errors="replace")
    card = None if own_card else model_card(source, info)  # PEFT's blank template is replaced
    if _is_local(to):
        target = Path(to.removeprefix("file://")).expanduser()
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise ConfigError(f"push: {target} already exists; pass --overwrite true to replace it")
        with atomic_dir(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            if card:
                (tmp / "README.md").write_text(card)
        print(f"pushed {source} ({info['stage']}, {info['kind']}) to {target}")
        return str(target)
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(to, private=private, exist_ok=True)
    if card:
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=to,
                        commit_message="Model card from alpaca-rlhf push")
    api.upload_folder(folder_path=str(source), repo_id=to, commit_message=message)
    print(f"pushed {source} ({info['stage']}, {info['kind']}) to {url}")
    return str(url)
