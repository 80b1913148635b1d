import math

import pytest
import torch

from alpaca_rlhf.ppo import (
    contains_eos,
    entropy_from_logits,
    first_eos_mask,
    logprobs_and_entropy,
    response_logits_slice,
    response_logprobs,
    response_positions,
    sequence_lengths,
)


def test_alignment_uses_the_position_before_each_token():
    # Prompt length C=3, response [2, 4], V=5. Only positions C-1+t = 2, 3 predict the response; every
    # other position is peaked on a wrong token, so a slice off by one scores the response at ~-20.
    context_length, vocab = 3, 5
    responses = torch.tensor([[2, 4]])
    logits = torch.zeros(1, context_length + 2, vocab)
    logits[0, :, 0] = 20.0
    logits[0, 2] = 0.0
    logits[0, 2, 2] = 20.0
    logits[0, 3] = 0.0
    logits[0, 3, 4] = 20.0
    logprobs = response_logprobs(response_logits_slice(logits, context_length), responses, temperature=1.0)
    peaked = 20.0 - math.log(math.exp(20.0) + 4)
    torch.testing.assert_close(logprobs, torch.tensor([[peaked, peaked]]))
    wrong = response_logprobs(logits[:, context_length:], responses, temperature=1.0)
    assert (wrong < -19).any()


def test_response_logprobs_matches_log_softmax_and_applies_temperature():
    # logits [2, 0] at tau 2 -> log_softmax([1, 0]) = [1 - log(1 + e), -log(1 + e)].
    logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]], dtype=torch.bfloat16)
    out = response_logprobs(logits, torch.tensor([[0, 1]]), temperature=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1 - math.log(1 + math.e), -math.log(1 + math.e)]]))
    torch.manual_seed(0)
    logits, responses = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    reference = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(response_logprobs(logits, responses, 0.7), reference)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError):
        response_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy():
    vocab = 11
    uniform = entropy_from_logits(torch.zeros(2, 3, vocab), 0.7)
    torch.testing.assert_close(uniform, torch.full((2, 3), math.log(vocab)))
    # logits [2, 0] at tau 2: p = softmax([1, 0]), H = -sum p log p.
    p = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)
    expected = -(p * p.log()).sum()
    torch.testing.assert_close(entropy_from_logits(torch.tensor([[[2.0, 0.0]]]), 2.0), expected.reshape(1, 1))


def test_first_eos_mask_with_pad_equal_to_eos():
    eos = 0  # also the pad id
    responses = torch.tensor(
        [
            [5, eos, eos, eos],  # EOS then padding
            [5, 6, 7, 8],  # no EOS
            [eos, 5, eos, 6],  # EOS first, then more tokens and a second EOS
            [5, 6, eos, eos],
        ]
    )
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    mask = first_eos_mask(responses, eos)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert torch.equal(sequence_lengths(mask), torch.tensor([2, 4, 1, 3]))
    assert torch.equal(contains_eos(responses, eos), torch.tensor([True, False, True, True]))


def test_first_eos_mask_with_several_stop_ids():
    responses = torch.tensor([[5, 9, 0, 1], [5, 6, 7, 0], [1, 2, 3, 4]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(first_eos_mask(responses, [0, 9]), expected)
    assert torch.equal(first_eos_mask(responses, (9, 0)), expected)
    assert torch.equal(contains_eos(responses, [0, 9]), torch.tensor([True, True, False]))


def test_logprobs_and_entropy_equal_the_separate_functions_and_log_softmax_gradients():
    # The fused path (cross-entropy log-probs, entropy's logsumexp taken from them) against log_softmax + gather
    # and the textbook entropy, values and gradients, at tau 1 (no scaling copy) and tau 0.7, on strided logits.
    torch.manual_seed(0)
    full = torch.randn(3, 6, 50) * 4
    responses = torch.randint(0, 50, (3, 5))
    for tau in (1.0, 0.7):
        logits = full.clone().requires_grad_()  # (3, 6, 50)
        strided = logits[:, :-1]  # (3, 5, 50), a non-contiguous view: the functions must not rely on contiguity
        assert not strided.is_contiguous()
        logprobs, entropy = logprobs_and_entropy(strided, responses, tau)
        reference = torch.log_softmax(strided / tau, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logprobs, reference)
        assert not entropy.requires_grad
        p = torch.softmax(full[:, :-1] / tau, -1)
        torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))
        torch.testing.assert_close(entropy_from_logits(full[:, :-1], tau), entropy)
        weights = torch.randn(3, 5)
        (grad,) = torch.autograd.grad((logprobs * weights).sum(), logits)
        (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(response_logprobs(full[:, :-1], responses, tau), reference.detach())


def test_response_positions_select_the_same_logits_as_the_slice():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 40, (2, 9))
    C, T = 4, 5
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = model(input_ids=ids, logits_to_keep=response_positions(C, T)).logits
    assert kept.shape == (2, T, 40) and kept.is_contiguous()
    torch.testing.assert_close(kept, response_logits_slice(full, C))
