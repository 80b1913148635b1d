"""The PPO policy: a causal LM with a LoRA adapter and a value head on the shared trunk."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from alpaca_rlhf.ppo.rollout import position_ids_from_mask


class ValueHead(nn.Module):
    """A scalar value per position from the trunk's last hidden state, kept in fp32 (TRL's ValueHead upcasts).

    Args:
        hidden_size: Width of the trunk's hidden states (given by the policy).
        init_std: Std of the weight init; 0 gives OAI's zero init, so the first values are exactly 0.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.summary.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: Tensor, **_) -> Tensor:
        return self.summary(hidden_states.float()).squeeze(-1)  # (B, L)


class PolicyWithValue(nn.Module):
    """A PEFT-wrapped causal LM plus a value model; one forward gives logits and values.

    The reference policy is the same network with the adapter disabled (`reference()`), so no second copy of
    the weights exists unless a separate reference model is configured.
    """

    def __init__(self, lm: nn.Module, value_head: Callable[[int], nn.Module] = ValueHead) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head(lm.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, with_values: bool = True) -> tuple[Tensor, Tensor]:
        """(logits (B, L, V), values (B, L) or None) for left-padded prompt + right-padded response."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                      output_hidden_states=with_values)
        if not with_values:
            return out.logits, None
        values = self.value_head(hidden_states=out.hidden_states[-1], input_ids=input_ids,
                                 attention_mask=attention_mask)
        return out.logits, values

    @torch.no_grad()
    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits of the frozen reference: the trunk with the adapter disabled."""
        with self.lm.disable_adapter():
            return self.forward(input_ids, attention_mask, with_values=False)[0]

    def generate(self, **kwargs):
        return self.lm.generate(**kwargs)
