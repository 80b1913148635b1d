"""Per-token log-probabilities, entropy and valid-token masks for sampled responses.

Layout (PPO.md §1): a left-padded prompt of length C followed by a right-padded response of length T.
"""

import torch
from torch import Tensor

EosIds = int | list[int] | tuple[int, ...]
"""One stop-token id, or several ids any of which ends a response."""


def response_logits_slice(logits: Tensor, context_length: int) -> Tensor:
    """Select the logits that score the response tokens.

    Args:
        logits: (B, C+T, V) logits over the whole `query_response`.
        context_length: C, the padded prompt length.

    Returns:
        (B, T, V) logits whose position t scores response token t.
    """
    return logits[:, context_length - 1 : -1]  # token t is predicted at position t-1


def response_logprobs(logits: Tensor, responses: Tensor, temperature: float) -> Tensor:
    """Log-probabilities of the sampled response tokens under temperature-scaled logits.

    The same function must produce the rollout, reference and training log-probs, so that the PPO ratio is
    exactly 1 before the first update (PPO.md §3 items 2 and 10).

    Args:
        logits: (B, T, V) logits already aligned to the response (see `response_logits_slice`).
        responses: (B, T) sampled token ids.
        temperature: sampling temperature τ > 0; logits are divided by it as in OAI, NPLUS and TRL-new.

    Returns:
        (B, T) float32 log π(y_t | x, y_<t).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    # fp32 before the softmax: bf16 log-probs make the ratio drift from 1 (PPO.md §3 item 10).
    scaled = logits.float() / temperature
    # Equals log_softmax(scaled).gather(...) without materialising a second (B, T, V) tensor.
    picked = scaled.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Entropy of the temperature-scaled next-token distribution (`trl/core.py` `entropy_from_logits`).

    Args:
        logits: (B, T, V) logits aligned to the response.
        temperature: sampling temperature τ > 0.

    Returns:
        (B, T) float32 entropy in nats: logsumexp(z) - Σ_v softmax(z)_v z_v with z = logits / τ.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)


def _is_eos(responses: Tensor, eos_token_id: EosIds) -> Tensor:
    """(B, T) bool: True where the token is one of the stop ids."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.isin(responses, torch.tensor(ids, dtype=responses.dtype, device=responses.device))


def first_eos_mask(responses: Tensor, eos_token_id: EosIds) -> Tensor:
    """Valid-token mask m_t = 1[t <= index of the first EOS] (PPO.md §1 and §6 item 2).

    Built from positions rather than `responses != pad`, which would drop every EOS when pad == eos.

    Args:
        responses: (B, T) sampled token ids.
        eos_token_id: the stop token id, or several ids any of which stops the response.

    Returns:
        (B, T) bool mask; the first EOS itself is valid, everything after it is not. A row without EOS is
        all True.
    """
    positions = torch.arange(responses.shape[1], device=responses.device)  # (T,)
    # A row without EOS gets first = T, so every position is valid.
    first = torch.where(_is_eos(responses, eos_token_id), positions, responses.shape[1]).min(dim=1).values
    return positions.unsqueeze(0) <= first.unsqueeze(1)


def sequence_lengths(mask: Tensor) -> Tensor:
    """Number of valid tokens per row.

    Args:
        mask: (B, T) bool or {0, 1} valid-token mask.

    Returns:
        (B,) int64 counts; the last valid index is `sequence_lengths(mask) - 1`.
    """
    return mask.long().sum(dim=1)


def contains_eos(responses: Tensor, eos_token_id: EosIds) -> Tensor:
    """Whether each response contains a stop token, for the missing-EOS penalty (PPO.md §2.4).

    Args:
        responses: (B, T) sampled token ids.
        eos_token_id: the stop token id, or several ids.

    Returns:
        (B,) bool.
    """
    return _is_eos(responses, eos_token_id).any(dim=1)
