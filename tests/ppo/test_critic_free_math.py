"""RLOO and GRPO math against numbers worked by hand (docs/algorithms.md), each citing its source."""

import math

import pytest
import torch

from alpaca_rlhf import ppo as F


def test_rloo_leave_one_out_baseline_by_hand():
    """Ahmadian et al. 2024 eq. (RLOO): A_i = r_i - mean_{j != i} r_j, groups of k contiguous rows."""
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    adv = F.rloo_advantages(r, 3)
    # prompt 1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 2: 0 - 1.5, 0 - 1.5, 3 - 0
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # the identity TRL uses: k/(k-1) * (r_i - group mean)
    torch.testing.assert_close(adv, 1.5 * (r.view(2, 3) - r.view(2, 3).mean(1, keepdim=True)).reshape(-1))
    torch.testing.assert_close(F.rloo_advantages(torch.tensor([5.0, 1.0]), 2), torch.tensor([4.0, -4.0]))


def test_rloo_and_grpo_refuse_a_group_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        F.rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="at least 2"):
        F.grpo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="multiple of k"):
        F.rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_grpo_group_normalised_with_the_unbiased_std_by_hand():
    """Shao et al. 2024 (GRPO, outcome supervision): (r - mean) / (std + 1e-4), std unbiased as TRL."""
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0])  # two prompts, k = 4
    adv, zero_std = F.grpo_advantages(r, 4)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # mean 3; unbiased: divide by k - 1 = 3 (biased would be /4)
    expected = [(x - 3.0) / (std + 1e-4) for x in (1.0, 2.0, 3.0, 6.0)] + [0.0] * 4  # equal rewards: 0, not NaN
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert zero_std.tolist() == [False, True]
    # Dr. GRPO (Liu et al. 2025): no division by the std
    adv, _ = F.grpo_advantages(r, 4, scale_rewards=False)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))


def test_clipped_surrogate_per_token_by_hand():
    """-min(A r, A clip(r, 1 - eps, 1 + eps_high)) per token (Schulman et al. 2017; DAPO's clip-higher)."""
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.7, 1.1]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])  # a sequence advantage, broadcast to every token
    loss, st = F.clipped_surrogate(new, old, adv, mask, epsilon=0.2)
    # row 0, A = 2: r 1.5 -> min(3, 2*1.2) = 2.4; r 0.5 -> min(1, 2*0.8 = 1.6) = 1; masked -> 0
    # row 1, A = -1: r 1.5 -> min(-1.5, -1.2) = -1.5; r 0.7 -> min(-0.7, -0.8) = -0.8; r 1.1 -> -1.1
    expected = torch.tensor([[-2.4, -1.0, 0.0], [1.5, 0.8, 1.1]])
    torch.testing.assert_close(loss, expected)
    # clipped: row 0 token 0 (r > 1.2, A > 0: high); row 1 token 1 (r < 0.8, A < 0: low) -> 2 of 5 valid tokens
    assert st["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert st["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert st["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    assert st["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.7 + 1.1) / 5)
    # clip-higher: eps_high 0.6 lets row 0 token 0 reach min(3, 2*1.5) = 3
    loss, _ = F.clipped_surrogate(new, old, adv, mask, epsilon=0.2, epsilon_high=0.6)
    assert loss[0, 0].item() == pytest.approx(-3.0)


def test_k3_is_grpo_s_in_loss_kl_by_hand():
    """exp(ref - logp) - (ref - logp) - 1 (Schulman 2020; GRPO eq. 4): 0 when equal, e - 2 at d = 1."""
    logp, ref = torch.tensor([0.0, -1.0, -2.0]), torch.tensor([0.0, 0.0, -3.0])
    torch.testing.assert_close(F.k3_kl(logp, ref), torch.tensor([0.0, math.e - 2, math.exp(-1)]))


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("grpo", (2.0 + 4.0 + 1.0) / 3),      # per-sequence token means 2, 4, 1; then their mean (GRPO paper)
    ("bnpo", (6.0 + 4.0 + 2.0) / 6),      # all valid tokens / their count (DAPO)
    ("dapo", (6.0 + 4.0 + 2.0) / 6),
    ("dr_grpo", (6.0 + 4.0 + 2.0) / (3 * 8)),  # / (sequences x max completion length 8) (Dr. GRPO)
])
def test_loss_reductions_by_hand(loss_type, expected):
    assert F.reduce_loss(PER_TOKEN, MASK, loss_type, max_length=8).item() == pytest.approx(expected)


def test_reductions_differ_so_the_switch_matters():
    values = {t: F.reduce_loss(PER_TOKEN, MASK, t, max_length=8).item() for t in ("grpo", "bnpo", "dr_grpo")}
    assert len(set(values.values())) == 3, values
    with pytest.raises(ValueError, match="loss_type"):
        F.reduce_loss(PER_TOKEN, MASK, "sum")
