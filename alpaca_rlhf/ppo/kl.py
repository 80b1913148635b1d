"""KL-coefficient controllers (Ziegler et al., 2019; docs/ppo.md §2.12).

`update` takes the rollout KL in nats per sequence (masked sum over tokens, mean over the batch) and the
number of episodes in the global batch; a per-token mean against `target=6` is a scale bug (docs/ppo.md §3
item 16). Call it once per PPO iteration, after the optimisation epochs.
"""


class KLController:
    """Holds β (`value`) and persists it through `state_dict` / `load_state_dict`."""

    def __init__(self, init_kl_coef: float) -> None:
        """Start from β = `init_kl_coef`.

        Args:
            init_kl_coef: initial β.
        """
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust β after one PPO iteration.

        Args:
            current_kl: rollout KL, nats per sequence.
            n_steps: episodes in the global batch.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        """The state to store in a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore β from `state_dict`."""
        self.value = float(state_dict["value"])


class FixedKLController(KLController):
    """Constant β (TRL-old `adap_kl_ctrl=False`, TRL-new, NPLUS)."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """Leave β unchanged."""


class AdaptiveKLController(KLController):
    """Proportional controller towards a target KL (OAI `train_policy.py`, TRL `AdaptiveKLController`)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        """Start from β = `init_kl_coef`.

        Args:
            init_kl_coef: initial β (TRL-old default 0.2).
            target: target KL in nats per sequence (TRL-old default 6).
            horizon: episodes over which a constant error changes β by a factor of about e^±0.2
                (TRL-old default 10000).
        """
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """β ← β·(1 + e·n/horizon) with e = clip(KL/target - 1, -0.2, 0.2).

        Args:
            current_kl: rollout KL, nats per sequence.
            n_steps: episodes in the global batch.
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
