import pytest

from alpaca_rlhf.ppo import AdaptiveKLController, FixedKLController


def test_adaptive_controller_case_4():
    # docs/ppo.md §2.12 Case 4: e = clip(KL/6 - 1, +-0.2), beta *= 1 + e * 128 / 10000.
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    expected = [0.2005120000, 0.1999986893, 0.1999986893, 0.2005106859, 0.1999973786, 0.2002533752]
    for current_kl, value in zip([8.0, 3.0, 6.0, 100.0, 0.0, 6.6], expected, strict=True):
        controller.update(current_kl, n_steps=128)
        assert controller.value == pytest.approx(value, abs=1e-9)


def test_fixed_controller_is_constant():
    controller = FixedKLController(0.05)
    for current_kl in [0.0, 6.0, 1e6]:
        controller.update(current_kl, n_steps=512)
    assert controller.value == 0.05


def test_state_dict_round_trip():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(100.0, n_steps=128)
    restored = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value != 0.2
    fixed = FixedKLController(0.1)
    fixed.load_state_dict({"value": 0.3})
    assert fixed.value == 0.3 and fixed.state_dict() == {"value": 0.3}


def test_adaptive_controller_rejects_bad_config():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, target=0.0, horizon=10000)
