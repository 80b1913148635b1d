"""Prompt templates: the Alpaca text (one text for SFT, the reward model and PPO) or the tokenizer's own chat
template (`template: chat`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from alpaca_rlhf.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
CHAT = "chat"
_ASSISTANT_PROBE = "\u2063assistant-turn-probe\u2063"  # a text no template writes by itself


def _special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, the added special ones (`<|eot_id|>`, `<|im_end|>`) included."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(token, "special", False))
    return ids


def user_content(instruction: str, input: str | None = None) -> str:
    """An Alpaca instruction and its optional input as one user message (a blank line between them)."""
    return f"{instruction}\n\n{input}" if input else instruction


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template in alpaca-lora's `templates/<name>.json` format, or the tokenizer's chat template.

    Attributes:
        prompt_input: Text with `{instruction}` and `{input}` placeholders.
        prompt_no_input: Text with an `{instruction}` placeholder, for records whose `input` is empty.
        response_split: Marker that precedes the response; `get_response` splits generated text on it.
        name: The template's name or path, recorded in exports.
        chat: Render with the tokenizer's `apply_chat_template` (the generation prompt ends the text); the
            instruction and input become one user message. Needs `bind(tokenizer)` before rendering.
        system: A system message put first in chat prompts; None = the chat template's own default.
    """

    prompt_input: str
    prompt_no_input: str
    response_split: str
    name: str = "alpaca"
    chat: bool = False
    system: str | None = None
    tokenizer: object = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, name_or_path: str = "alpaca") -> PromptTemplate:
        """Loads a bundled template by name (`alpaca`, or `chat` for the tokenizer's own) or a JSON file."""
        if name_or_path == CHAT:
            return cls("", "", "", CHAT, chat=True)
        path = Path(name_or_path)
        if not path.suffix:
            path = TEMPLATE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise FileNotFoundError(f"prompt template {name_or_path!r} not found (looked for {path})")
        spec = json.loads(path.read_text(encoding="utf-8"))
        if spec.get("chat"):
            return cls("", "", "", str(name_or_path), chat=True, system=spec.get("system"))
        missing = [k for k in ("prompt_input", "prompt_no_input", "response_split") if k not in spec]
        if missing:
            raise ConfigError(f"{path}: template lacks field(s) {missing}")
        return cls(spec["prompt_input"], spec["prompt_no_input"], spec["response_split"], str(name_or_path))

    def bind(self, tokenizer) -> PromptTemplate:
        """This template with its tokenizer (which renders a chat template, and gives the end-of-turn ids)."""
        if self.chat and getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"template 'chat': tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no "
                             "chat template; use template: alpaca")
        return replace(self, tokenizer=tokenizer)

    def render(self, instruction: str, input: str | None = None) -> str:
        """The prompt for one instruction, ending where the response begins."""
        if self.chat:
            return self.render_messages([{"role": "user", "content": user_content(instruction, input)}])
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def render_messages(self, messages: list[dict]) -> str:
        """The prompt for a conversation (`[{role, content}, ...]`) whose next turn is the assistant's.

        Chat templates render it with the generation prompt; the Alpaca text takes the last user turn as the
        instruction and the earlier turns, as `Role: text` lines, as its input.
        """
        if self.chat:
            if self.tokenizer is None:
                raise RuntimeError("chat template used before bind(tokenizer)")
            if self.system is not None and (not messages or messages[0].get("role") != "system"):
                messages = [{"role": "system", "content": self.system}, *messages]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        *context, last = messages
        history = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in context if m["role"] != "system")
        return self.render(last["content"], history)

    def end_of_turn_ids(self, tokenizer=None) -> list[int]:
        """The ids that close a trained response: what the chat template writes after an assistant message, up to
        and including its first special token (`<|eot_id|>` for Llama 3, `<|im_end|>` for ChatML, `<end_of_turn>`
        for Gemma); EOS for a text template, or a chat template that writes no special token there.

        Read from the template's rendering of a whole conversation, so the model learns to end a turn the way
        the template (and every chat runtime) expects, not with `<|end_of_text|>`."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise RuntimeError("end_of_turn_ids needs a tokenizer (bind(tokenizer) first)")
        eos = [tokenizer.eos_token_id]
        if not self.chat:
            return eos
        bound = self if self.tokenizer is tokenizer else self.bind(tokenizer)
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ASSISTANT_PROBE}]
        if bound.system is not None:
            messages.insert(0, {"role": "system", "content": bound.system})
        try:
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that refuses a finished conversation (rare): keep EOS
            return eos
        if _ASSISTANT_PROBE not in full:
            return eos
        tail = full.split(_ASSISTANT_PROBE, 1)[1]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        special = _special_ids(tokenizer)
        for i, token in enumerate(ids):
            if token in special:
                return ids[: i + 1]
        return eos

    def stop_token_ids(self, tokenizer=None) -> list[int]:
        """The ids that end generation: the template's end-of-turn token and EOS (each once)."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        ids = [self.end_of_turn_ids(tokenizer)[-1], tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def get_response(self, text: str) -> str:
        """The part of a decoded prompt+response after the response marker."""
        if not self.response_split:
            return text.strip()
        return text.split(self.response_split, 1)[-1].strip() if self.response_split in text else text.strip()

    def section_markers(self) -> set[str]:
        """Lines that start a template section (`### Instruction:`): a reply that writes one ran on."""
        return {line.strip() for t in (self.prompt_input, self.prompt_no_input) for line in t.splitlines()
                if line.startswith("#")}

    def to_json(self) -> dict:
        if self.chat:
            return {"description": "the tokenizer's own chat template (apply_chat_template)", "chat": True,
                    "system": self.system}
        return {
            "description": f"prompt template {self.name!r} used in training",
            "prompt_input": self.prompt_input,
            "prompt_no_input": self.prompt_no_input,
            "response_split": self.response_split,
        }
