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

    The reference policy is the same network with the adapter disabled (`reference_logits()`), so no second
    copy of the weights exists unless a separate reference model is configured.
    """

    def __init__(self, lm: nn.Module, value_head: Callable[[int], nn.Module] = ValueHead) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head(lm.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, context_length: int,
                with_values: bool = True) -> tuple[Tensor, Tensor | None]:
        """Response-aligned (logits (B, T, V), values (B, T) or None) for a left-padded prompt of length
        C = `context_length` followed by a right-padded response of length T.

        Position t scores response token t (it sits at C-1+t). The output layer runs on those T positions only
        (`logits_to_keep`), never on the prompt: with a 128k vocabulary, logits for every position of a batch
        cost gigabytes. The value model sees the trunk's whole last hidden state (taken with a hook, not with
        `output_hidden_states`, which would keep every layer's).
        """
        T = input_ids.shape[1] - context_length
        hidden: list[Tensor] = []
        hook = self.trunk().register_forward_hook(_keep_last_hidden(hidden)) if with_values else None
        try:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                          logits_to_keep=T + 1)
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits[:, :-1]  # the last position predicts past the response
        if not with_values:
            return logits, None
        values = self.value_head(hidden_states=hidden[0], input_ids=input_ids, attention_mask=attention_mask)
        return logits, values[:, context_length - 1 : -1]  # V(s_t) where token t is predicted

    def trunk(self) -> nn.Module:
        """The decoder stack under the output layer (`LlamaModel` for LLaMA), through the PEFT wrapper."""
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return getattr(base, base.base_model_prefix)

    @torch.no_grad()
    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
        """Response-aligned logits of the frozen reference: the trunk with the adapter disabled."""
        with self.lm.disable_adapter():
            return self.forward(input_ids, attention_mask, context_length, with_values=False)[0]

    def generate(self, **kwargs):
        return self.lm.generate(**kwargs)


def _keep_last_hidden(store: list[Tensor]):
    def hook(module, args, output):
        store.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    return hook
