"""Per-token log-probabilities, entropy and valid-token masks for sampled responses.

Layout (docs/ppo.md §1): a left-padded prompt of length C followed by a right-padded response of length T.
"""

import torch
import torch.nn.functional as F
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


def response_positions(context_length: int, response_length: int, device=None) -> Tensor:
    """The T positions C-1 ... C+T-2 that score the response tokens, as an index tensor for a model's
    `logits_to_keep`: the output layer then runs on those positions only and returns contiguous (B, T, V) logits
    (`logits_to_keep=T + 1` and slicing off the last position gives a strided view that every later (B, T, V)
    operation copies or walks slowly)."""
    return torch.arange(context_length - 1, context_length - 1 + response_length, device=device)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """fp32 logits / temperature; no copy for fp32 logits at temperature 1 (x / 1 == x exactly)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    # fp32 before the softmax: bf16 log-probs make the ratio drift from 1 (docs/ppo.md §3 item 10).
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _token_logprobs(scaled: Tensor, responses: Tensor) -> Tensor:
    # cross_entropy is a fused log-softmax + gather: one pass over the vocabulary forward, and a backward that
    # writes the (..., V) gradient once (logsumexp's backward and a separate gather take about twice as long).
    flat = F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), responses.reshape(-1), reduction="none")
    return -flat.view(responses.shape)


def response_logprobs(logits: Tensor, responses: Tensor, temperature: float) -> Tensor:
    """Log-probabilities of the sampled response tokens under temperature-scaled logits.

    The same function must produce the rollout, reference and training log-probs, so that the PPO ratio is
    exactly 1 before the first update (docs/ppo.md §3 items 2 and 10).

    Args:
        logits: (B, T, V) logits already aligned to the response (see `response_logits_slice`).
        responses: (B, T) sampled token ids.
        temperature: sampling temperature τ > 0; logits are divided by it as in OAI, NPLUS and TRL-new.

    Returns:
        (B, T) float32 log π(y_t | x, y_<t), equal to log_softmax(logits / τ) at the sampled ids.
    """
    return _token_logprobs(_scaled(logits, temperature), responses)


def _entropy(scaled: Tensor, logsumexp: Tensor) -> Tensor:
    probs = torch.softmax(scaled, dim=-1)
    # Σ_v p_v z_v as a batched dot product: no third (..., V) tensor for p * z
    dot = torch.matmul(probs.unsqueeze(-2), scaled.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return logsumexp - dot


def entropy_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Entropy of the temperature-scaled next-token distribution (`trl/core.py` `entropy_from_logits`).

    Args:
        logits: (B, T, V) logits aligned to the response.
        temperature: sampling temperature τ > 0.

    Returns:
        (B, T) float32 entropy in nats: logsumexp(z) - Σ_v softmax(z)_v z_v with z = logits / τ.
    """
    scaled = _scaled(logits, temperature)  # differentiable (an entropy bonus could use it)
    return _entropy(scaled, torch.logsumexp(scaled, dim=-1))


def logprobs_and_entropy(logits: Tensor, responses: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """`response_logprobs` (with autograd) and `entropy_from_logits` (without) from one scaling of the logits.

    The entropy's logsumexp comes free from the log-probs: log π(y) = z_y - logsumexp(z), so
    logsumexp(z) = z_y - log π(y); what is left is one softmax and one dot product per position. A training
    step over a 49k vocabulary spent more time on a separate entropy than on its log-probs.

    Returns:
        ((B, T) float32 log-probs, with grad if `logits` has it; (B, T) float32 entropy, detached).
    """
    scaled = _scaled(logits, temperature)
    logprobs = _token_logprobs(scaled, responses)
    with torch.no_grad():
        z = scaled.detach()
        logsumexp = z.gather(-1, responses.unsqueeze(-1)).squeeze(-1) - logprobs.detach()
        return logprobs, _entropy(z, logsumexp)


def _is_eos(responses: Tensor, eos_token_id: EosIds) -> Tensor:
    """(B, T) bool: True where the token is one of the stop ids."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.isin(responses, torch.tensor(ids, dtype=responses.dtype, device=responses.device))


def first_eos_mask(responses: Tensor, eos_token_id: EosIds) -> Tensor:
    """Valid-token mask m_t = 1[t <= index of the first EOS] (docs/ppo.md §1 and §4 item 2).

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
    """Whether each response contains a stop token, for the missing-EOS penalty (docs/ppo.md §2.4).

    Args:
        responses: (B, T) sampled token ids.
        eos_token_id: the stop token id, or several ids.

    Returns:
        (B,) bool.
    """
    return _is_eos(responses, eos_token_id).any(dim=1)
