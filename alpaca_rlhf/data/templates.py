"""The Alpaca prompt template, one text for SFT, the reward model and PPO."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template in alpaca-lora's `templates/<name>.json` format.

    Attributes:
        prompt_input: Text with `{instruction}` and `{input}` placeholders.
        prompt_no_input: Text with an `{instruction}` placeholder, for records whose `input` is empty.
        response_split: Marker that precedes the response; `get_response` splits generated text on it.
        name: The template's name or path, recorded in exports.
    """

    prompt_input: str
    prompt_no_input: str
    response_split: str
    name: str = "alpaca"

    @classmethod
    def load(cls, name_or_path: str = "alpaca") -> PromptTemplate:
        """Loads a bundled template by name (`alpaca`) or a JSON file by path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = TEMPLATE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise FileNotFoundError(f"prompt template {name_or_path!r} not found (looked for {path})")
        spec = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("prompt_input", "prompt_no_input", "response_split") if k not in spec]
        if missing:
            raise ValueError(f"{path}: template lacks field(s) {missing}")
        return cls(spec["prompt_input"], spec["prompt_no_input"], spec["response_split"], str(name_or_path))

    def render(self, instruction: str, input: str | None = None) -> str:
        """The prompt for one instruction, ending where the response begins."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def get_response(self, text: str) -> str:
        """The part of a decoded prompt+response after the response marker."""
        return text.split(self.response_split, 1)[-1].strip() if self.response_split in text else text.strip()

    def to_json(self) -> dict:
        return {
            "description": f"prompt template {self.name!r} used in training",
            "prompt_input": self.prompt_input,
            "prompt_no_input": self.prompt_no_input,
            "response_split": self.response_split,
        }
