"""The online stages' policy: a causal LM with a LoRA adapter and a value head on the shared trunk; and the
checks of what a policy may be built from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from torch import Tensor, nn

from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    load_trunk,
    read_reward_stats,
    touches_output_layer,
    unwrap_peft,
)
from alpaca_rlhf.ppo.logprobs import response_positions
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
        with torch.autocast(hidden_states.device.type, enabled=False):  # bf16-mixed would recast the Linear
            return self.summary(hidden_states.float()).squeeze(-1)  # (B, L) in fp32


class SeparateCritic(nn.Module):
    """A value model with a trunk of its own, as TRL-new and N+ implementation details warm-start it from the
    reward model (docs/ppo.md §3 item 12), instead of a head on the policy's trunk.

    It ignores the policy's hidden states and runs its own decoder over the same token ids (so it must share
    the policy's tokenizer: an RM trained from the same base does). A LoRA adapter on that trunk and an fp32
    scalar head train with the policy's optimizer, are saved in the Lightning checkpoint, and land in the
    exports' `value_head.safetensors` (trainable tensors only; the trunk is `model`). Cost: a second set of
    trunk weights (`model.quantization: 4bit` or `8bit` shrinks it) and a second trunk in every forward.

    YAML::

        value_head:
          class_path: alpaca_rlhf.modules.policy.SeparateCritic
          init_args:
            model: {name_or_path: output/tiny/reward_model-adapter-merged}
            init_from_score: true

    Args:
        hidden_size: The policy's hidden size (given by `PolicyWithValue`; the critic uses its own).
        model: The critic's weights: a merged reward model (sequence classifier) or any causal-LM folder.
        lora: Adapter on the critic's trunk; None = only the head trains.
        init_from_score: Start the head from the folder's `score` layer (the RM's head) instead of 0.
        center: With `init_from_score`, set the head's bias to minus the RM's held-out mean (`reward_stats.json`),
            as `RewardModelScorer(center=True)` shifts the rewards: the critic then starts on the scale of the
            returns it predicts (a bias 0 head starts a whole mean off, and the bias moves ~lr per step).
    """

    def __init__(self, hidden_size: int, model: ModelSpec,
                 lora: LoraSpec | None = LoraSpec(r=16, alpha=32, dropout=0.0,
                                                  target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
                 init_from_score: bool = False, center: bool = True) -> None:
        super().__init__()

        trunk = load_trunk(model, trainable=lora is not None)
        self.trunk = apply_lora(trunk, lora, task_type="FEATURE_EXTRACTION") if lora is not None else trunk
        self.summary = nn.Linear(trunk.config.hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)
        if init_from_score:
            self.summary.weight.data.copy_(_score_weight(model.name_or_path).float().reshape(1, -1))
            if center:
                self.summary.bias.data.fill_(-float(read_reward_stats(model.name_or_path).get("mean", 0.0)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_) -> Tensor:
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        with torch.autocast(input_ids.device.type, enabled=False):  # fp32 values under bf16-mixed too
            return self.summary(out.last_hidden_state.float()).squeeze(-1)  # (B, L)


def _score_weight(folder: str) -> Tensor:
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            if "score.weight" in f.keys():
                return f.get_tensor("score.weight")
    raise ValueError(f"{folder}: init_from_score needs a sequence-classifier folder with a 'score.weight' tensor "
                     "(a merged reward model); none of its *.safetensors files has one")


class PolicyWithValue(nn.Module):
    """A PEFT-wrapped causal LM plus a value model; one forward gives logits and values.

    The reference policy is the same network with the adapter disabled (`reference_logits()`), so no second
    copy of the weights exists unless a separate reference model is configured.
    """

    def __init__(self, lm: nn.Module, value_head: Callable[[int], nn.Module] | None = ValueHead) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head(lm.config.hidden_size) if value_head is not None else None  # None: no critic

    def forward(self, input_ids: Tensor, attention_mask: Tensor, context_length: int,
                with_values: bool = True) -> tuple[Tensor, Tensor | None]:
        """Response-aligned (logits (B, T, V), values (B, T) or None) for a left-padded prompt of length
        C = `context_length` followed by a right-padded response of length T.

        Position t scores response token t (it sits at C-1+t). The output layer runs on those T positions only
        (`logits_to_keep` as indices: contiguous logits), never on the prompt: with a 128k vocabulary, logits for
        every position of a batch cost gigabytes. The value model sees the trunk's whole last hidden state (taken
        with a hook, not with `output_hidden_states`, which would keep every layer's).
        """
        T = input_ids.shape[1] - context_length
        with_values = with_values and self.value_head is not None
        hidden: list[Tensor] = []
        hook = self.trunk().register_forward_hook(_keep_last_hidden(hidden)) if with_values else None
        try:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                          logits_to_keep=response_positions(context_length, T, input_ids.device))
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits
        if not with_values:
            return logits, None
        values = self.value_head(hidden_states=hidden[0], input_ids=input_ids, attention_mask=attention_mask)
        return logits, values[:, context_length - 1 : -1]  # V(s_t) where token t is predicted

    def trunk(self) -> nn.Module:
        """The decoder stack under the output layer (`LlamaModel` for LLaMA), through the PEFT wrapper."""
        base = unwrap_peft(self.lm)
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


def input_model(model: ModelSpec | None, policy: ModelSpec | None) -> ModelSpec:
    """The online stage's input model: `model` (every stage's name for it), or `policy`, its old name here."""
    if policy is None:
        if model is None:
            raise ConfigError("model.model is required: the merged SFT checkpoint the policy starts from")
        return model
    if model is not None:
        raise ConfigError("model.model and model.policy (its old name) are both given: keep model only")
    rank_zero_warn("model.policy is the old name of model.model (every stage's input model); rename the key")
    return policy


def check_policy_settings(algorithm: str, policy: ModelSpec, scorer, lora: LoraSpec, generation,
                          ref_model: ModelSpec | None) -> None:
    """Settings that cannot make a sound online stage, refused before any model loads."""
    if scorer is None:
        raise ConfigError(f"{algorithm}: model.scorer is required (RewardModelScorer on the merged reward model, or "
                          "any alpaca_rlhf.modules.scorers.Scorer)")
    if lora.bias != "none" and ref_model is None:
        raise ConfigError(f"lora.bias={lora.bias!r} trains the base model's biases, which disabling the adapter "
                          "does not undo: the reference would drift with the policy. Use bias: none, or give a "
                          "separate ref_model")
    if generation.merge_adapter and policy.quantization:
        raise ConfigError(f"generation.merge_adapter folds LoRA into the base weights, which a "
                          f"{policy.quantization} base cannot hold exactly; turn it off for a quantized policy")
    if generation.merge_adapter and policy.torch_dtype != torch.float32:
        raise ConfigError(f"generation.merge_adapter folds LoRA into {policy.dtype} base weights and out again "
                          "around every rollout: each round trip rounds the frozen base (also the reference) a "
                          "little further (0.02 relative after 400 rollouts); use policy.dtype float32 (with "
                          "bf16-mixed precision for speed) or turn merge_adapter off")


def check_tied_merge(lm, lora: LoraSpec, generation) -> None:
    """Merging LoRA on lm_head into a tied output layer would change the input embeddings too."""
    if generation.merge_adapter and getattr(lm.config, "tie_word_embeddings", False) and touches_output_layer(lora):
        raise ConfigError("generation.merge_adapter with LoRA on lm_head of a model whose output layer is tied "
                          "to its input embeddings would fold the adapter into the shared embedding matrix: "
                          "generation would sample another policy. Leave lm_head out of lora.target_modules "
                          "(all-linear does) or turn merge_adapter off")
