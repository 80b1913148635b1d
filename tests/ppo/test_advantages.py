import math

import pytest
import torch

from alpaca_rlhf.ppo import explained_variance, gae, masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # valid: 1, 2, 4


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(X, MASK).item() == pytest.approx(7.0)
    assert masked_mean(X, MASK).item() == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_mean(X, MASK.float(), dim=1), torch.tensor([1.5, 4.0]))


def test_masked_var_by_hand():
    # Deviations from 7/3 are -4/3, -1/3, 5/3; squares sum to 42/9 = 14/3.
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(14.0 / 9.0)
    assert masked_var(X, MASK).item() == pytest.approx(7.0 / 3.0)


def test_masked_var_empty_mask_raises():
    with pytest.raises(ValueError):
        masked_var(X, torch.zeros_like(MASK))


def test_masked_var_single_element_falls_back_to_biased():
    one = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    with pytest.warns(UserWarning):
        var = masked_var(X, one)
    assert var.item() == 0.0
    with pytest.warns(UserWarning):
        whitened = masked_whiten(X, one)
    assert torch.isfinite(whitened).all()


def test_masked_whiten_by_hand():
    mean, std = 7.0 / 3.0, math.sqrt(7.0 / 3.0)
    expected = (torch.tensor([1.0, 2.0, 4.0]) - mean) / math.sqrt(std**2 + 1e-8)
    out = masked_whiten(X, MASK)
    torch.testing.assert_close(out[MASK], expected)
    torch.testing.assert_close(masked_whiten(X, MASK, shift_mean=False)[MASK], expected + mean)


def test_masked_whiten_reproduces_n_blog_example():
    # N-blog "the N implementation details of RLHF with PPO", reward whitening (shift_mean=False):
    # TF's biased moments give [0.0508, 0.4381, 0.8254], torch's unbiased [0.1394, 0.5046, 0.8697] on row 0.
    rewards = torch.tensor([[1.2, 1.3, 1.4], [1.5, 1.6, 1.7], [1.8, 1.9, 2.0]])
    ones = torch.ones_like(rewards)
    unbiased = masked_whiten(rewards, ones, shift_mean=False)
    biased = masked_whiten(rewards, ones, shift_mean=False, unbiased=False)
    torch.testing.assert_close(unbiased[0], torch.tensor([0.1394, 0.5046, 0.8697]), atol=1e-4, rtol=0)
    torch.testing.assert_close(biased[0], torch.tensor([0.0508, 0.4381, 0.8254]), atol=1e-4, rtol=0)


def test_padding_does_not_leak_into_statistics():
    garbage = X.clone()
    garbage[~MASK] = torch.tensor([1e6, float("inf"), float("nan")])
    assert masked_mean(garbage, MASK) == masked_mean(X, MASK)
    assert masked_var(garbage, MASK) == masked_var(X, MASK)
    torch.testing.assert_close(masked_whiten(garbage, MASK)[MASK], masked_whiten(X, MASK)[MASK])


VALUES = torch.tensor([[0.5, 1.0, 2.0]])
REWARDS = torch.tensor([[0.1, -0.2, 1.5]])
FULL = torch.ones(1, 3)


def test_gae_by_hand():
    # gamma=1, lam=0.95:
    #   d2 = 1.5 + 0 - 2.0 = -0.5                 A2 = -0.5
    #   d1 = -0.2 + 2.0 - 1.0 = 0.8               A1 = 0.8 + 0.95 * -0.5 = 0.325
    #   d0 = 0.1 + 1.0 - 0.5 = 0.6                A0 = 0.6 + 0.95 * 0.325 = 0.90875
    advantages, returns = gae(VALUES, REWARDS, FULL, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.90875, 0.325, -0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.40875, 1.325, 1.5]]))


def test_gae_lambda_one_is_monte_carlo():
    # A_t = sum_{k>=t} r_k - V_t: reward-to-go [1.4, 1.3, 1.5].
    advantages, returns = gae(VALUES, REWARDS, FULL, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.9, 0.3, -0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.4, 1.3, 1.5]]))


def test_with_an_untrained_critic_lambda_decides_how_much_score_reaches_the_first_token():
    # docs/ppo.md §2.6 and configs/smol/ppo.yaml: values ~0 and one score at the last of 40 tokens. With 0.95 the
    # first token gets 0.95^39 = 0.135 of it and the last all of it; with 1.0 every token gets all of it.
    length, score = 40, 2.0
    rewards = torch.zeros(1, length)
    rewards[0, -1] = score
    values, mask = torch.zeros(1, length), torch.ones(1, length)
    advantages, _ = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    assert advantages[0, 0].item() / score == pytest.approx(0.135, abs=0.001)  # 0.95^39
    assert advantages[0, -1].item() == pytest.approx(score)
    advantages, _ = gae(values, rewards, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.full((1, length), score))


def test_gae_lambda_zero_is_td_error():
    advantages, _ = gae(VALUES, REWARDS, FULL, gamma=1.0, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.6, 0.8, -0.5]]))


def test_gae_matches_closed_form():
    # A_t = sum_k (gamma*lam)^(k-t) delta_k, as one triangular matrix product.
    torch.manual_seed(0)
    gamma, lam, length = 0.9, 0.8, 7
    values, rewards = torch.randn(4, length, dtype=torch.float64), torch.randn(4, length, dtype=torch.float64)
    ones = torch.ones(4, length)
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    deltas = rewards + gamma * next_values - values
    k, t = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    discount = torch.where(k >= t, (gamma * lam) ** (k - t).double(), torch.zeros((), dtype=torch.float64))
    advantages, returns = gae(values, rewards, ones, gamma, lam)
    torch.testing.assert_close(advantages, deltas @ discount)
    torch.testing.assert_close(returns, deltas @ discount + values)


def test_gae_bootstraps_zero_after_last_valid_token():
    # Padding holds large values and rewards; the 2-token row must equal the same row without padding.
    values = torch.tensor([[0.5, 1.0, 100.0, -50.0]])
    rewards = torch.tensor([[0.1, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    advantages, returns = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # d1 = 0.7 + 0 - 1.0 = -0.3; d0 = 0.1 + 1.0 - 0.5 = 0.6; A0 = 0.6 + 0.95 * -0.3 = 0.315
    torch.testing.assert_close(advantages, torch.tensor([[0.315, -0.3, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.815, 0.7, 0.0, 0.0]]))


def test_gae_does_not_track_gradients():
    values = VALUES.clone().requires_grad_()
    advantages, returns = gae(values, REWARDS, FULL, gamma=1.0, lam=0.95)
    assert not advantages.requires_grad and not returns.requires_grad


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 5.0), returns, mask).item() == pytest.approx(0.0)
    # Residuals [-0.5, 0, 0.5] have a quarter of the variance of [1, 2, 3]; padding value 0 is ignored.
    values = torch.tensor([[1.5, 2.0, 2.5, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.75)
