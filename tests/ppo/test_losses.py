import math

import pytest
import torch

from alpaca_rlhf.ppo import policy_loss, value_loss


def test_ratio_one_gives_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    advantages = torch.tensor([[1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5)  # -(1 - 2) / 2; the masked 100 is ignored
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["policy_kl"].item() == 0.0
    assert stats["ratio"].item() == 1.0 and stats["ratio_max"].item() == 1.0


def test_clipping_binds_by_sign_of_advantage():
    # ratios [1.5, 0.5, 0.5, 1.5] and A [2, -1, 2, -1], eps 0.2; per-token loss max(-A r, -A clip(r)):
    #   r=1.5, A=2:  max(-3.0, -2.4) = -2.4  clipped
    #   r=0.5, A=-1: max(0.5, 0.8)   = 0.8   clipped
    #   r=0.5, A=2:  max(-1.0, -1.6) = -1.0  unclipped (pessimistic side)
    #   r=1.5, A=-1: max(1.5, 1.2)   = 1.5   unclipped
    # Token 5 is padding with a huge ratio.
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1e3]])
    old_logprobs = torch.full((1, 5), -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    advantages = torch.tensor([[2.0, -1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-2.4 + 0.8 - 1.0 + 1.5) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    log_ratios = [math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 4)
    assert stats["policy_kl"].item() == pytest.approx(-sum(log_ratios) / 4)
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert not any(value.requires_grad for value in stats.values())
    loss.backward()
    # d/dlogp of -A r is -A r / n on unclipped tokens; clipped and padded tokens get no gradient.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -2.0 * 0.5 / 4, 1.0 * 1.5 / 4, 0.0]]))


def test_token_level_mean_over_minibatch():
    # Rows of 1 and 3 valid tokens: a token mean (sum 4 / 4) differs from a mean of row means.
    logprobs = torch.zeros(2, 3)
    advantages = torch.tensor([[4.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = policy_loss(logprobs, logprobs, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.0)


VALUES = torch.tensor([[1.0, 1.5, 50.0]])
OLD_VALUES = torch.tensor([[0.5, 1.0, 0.0]])
RETURNS = torch.tensor([[2.0, 1.0, 0.0]])
VALUE_MASK = torch.tensor([[1, 1, 0]])


def test_value_loss_clipping_by_hand():
    # eps_v 0.2:
    #   V=1.0, old 0.5 -> V_clip 0.7; (1-2)^2 = 1,    (0.7-2)^2 = 1.69 -> 1.69 clipped
    #   V=1.5, old 1.0 -> V_clip 1.2; (1.5-1)^2 = .25, (1.2-1)^2 = .04 -> 0.25 unclipped
    values = VALUES.clone().requires_grad_()
    loss, stats = value_loss(values, OLD_VALUES, RETURNS, VALUE_MASK, value_clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25) / 2)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)
    assert stats["value_mean"].item() == pytest.approx(1.25)
    loss.backward()
    # Only the unclipped token has a gradient: 0.5 * 2 * (1.5 - 1) / 2.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.25, 0.0]]))


def test_value_loss_without_clipping():
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, value_clip_range=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    assert stats["value_clipfrac"].item() == 0.0
