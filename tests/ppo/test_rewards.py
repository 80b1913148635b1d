import math

import pytest
import torch

from alpaca_rlhf.ppo import (
    KL_ESTIMATORS,
    approx_kl,
    first_eos_mask,
    kl_penalized_rewards,
    process_scores,
    whiten_rewards,
)

# d = logp - ref = +1 and -1.
LOGPROBS = torch.tensor([[-1.0, -2.0]])
REF_LOGPROBS = torch.tensor([[-2.0, -1.0]])


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", [1.0, -1.0]),
        ("abs", [1.0, 1.0]),
        ("k2", [0.5, 0.5]),
        # exp(ref - logp) - 1 + (logp - ref): exp(-1) - 1 + 1 and exp(1) - 1 - 1.
        ("k3", [math.exp(-1.0), math.e - 2.0]),
    ],
)
def test_kl_estimators_by_hand(estimator, expected):
    torch.testing.assert_close(approx_kl(LOGPROBS, REF_LOGPROBS, estimator), torch.tensor([expected]))


def test_k3_is_non_negative():
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    assert (approx_kl(logprobs, ref_logprobs, "k3") >= 0).all()
    assert approx_kl(logprobs, logprobs, "k3").abs().max() == 0


def test_callable_estimator_and_registry():
    def doubled(logprobs, ref_logprobs):
        return 2 * (logprobs - ref_logprobs)

    torch.testing.assert_close(approx_kl(LOGPROBS, REF_LOGPROBS, doubled), torch.tensor([[2.0, -2.0]]))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs"}


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        approx_kl(LOGPROBS, REF_LOGPROBS, "k4")


EOS = 0  # also the pad id
RESPONSES = torch.tensor(
    [
        [5, EOS, EOS, EOS],  # EOS at 1
        [5, 6, 7, 8],  # no EOS: all valid
        [EOS, 5, EOS, EOS],  # EOS at 0
    ]
)


def test_score_on_last_valid_token():
    mask = first_eos_mask(RESPONSES, EOS)
    logprobs = torch.full((3, 4), -1.0)
    ref_logprobs = torch.full((3, 4), -1.5)
    logprobs[~mask] = 50.0  # padding garbage must not reach the KL
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, 0.5 * mask.float())
    expected = torch.tensor(
        [
            [-0.05, -0.05 + 1.0, 0.0, 0.0],
            [-0.05, -0.05, -0.05, -0.05 + 2.0],
            [-0.05 + 3.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_kl_penalized_rewards_with_k3_is_zero_outside_mask():
    mask = first_eos_mask(RESPONSES, EOS)
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(3, 4), -torch.rand(3, 4)
    rewards, kl = kl_penalized_rewards(torch.zeros(3), logprobs, ref_logprobs, mask, 0.2, estimator="k3")
    assert (kl[~mask] == 0).all() and (rewards[~mask] == 0).all()
    torch.testing.assert_close(rewards[mask], -0.2 * approx_kl(logprobs, ref_logprobs, "k3")[mask])


def test_process_scores_bias_clip_penalty():
    scores = torch.tensor([0.5, 10.0, -10.0, 2.0])
    has_eos = torch.tensor([True, True, False, False])
    # minus bias 1: [-0.5, 9, -11, 1]; clip +-3: [-0.5, 3, -3, 1]; penalty 1 where no EOS: [-0.5, 3, -4, 0]
    out = process_scores(
        scores, contains_eos=has_eos, missing_eos_penalty=1.0, score_clip=3.0, score_bias=1.0
    )
    torch.testing.assert_close(out, torch.tensor([-0.5, 3.0, -4.0, 0.0]))
    torch.testing.assert_close(process_scores(scores), scores)
    assert scores[1] == 10.0  # input untouched


def test_an_early_eos_costs_the_short_response_penalty():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    lengths = torch.tensor([1, 7, 8, 30])  # EOS included: an empty answer is 1 token
    out = process_scores(scores, response_lengths=lengths, min_response_tokens=8, short_response_penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    torch.testing.assert_close(process_scores(scores, response_lengths=lengths, min_response_tokens=None,
                                              short_response_penalty=2.0), scores)
    with pytest.raises(ValueError, match="response_lengths"):
        process_scores(scores, min_response_tokens=8, short_response_penalty=1.0)


def test_process_scores_penalty_needs_contains_eos():
    with pytest.raises(ValueError):
        process_scores(torch.zeros(2), missing_eos_penalty=1.0)


def test_whiten_rewards_keeps_mean_and_zeros_padding():
    rewards = torch.tensor([[1.0, 2.0, 7.0], [4.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = whiten_rewards(rewards, mask)
    # valid [1, 2, 4]: mean 7/3, unbiased var 7/3.
    mean, std = 7.0 / 3.0, math.sqrt(7.0 / 3.0)
    expected = (torch.tensor([1.0, 2.0, 4.0]) - mean) / std + mean
    torch.testing.assert_close(out[mask.bool()], expected)
    assert (out[~mask.bool()] == 0).all()
