"""E1 InfAlign's calibrate-and-transform reward (CTRL, arXiv:2412.19792) for best-of-n-aware training.

Calibrate: C(x, y) = P_{y' ~ pi_ref(.|x)}[r(x, y') < r(x, y)] + 0.5 P[r(x, y') = r(x, y)], the
reference win rate of y (estimated from m reference samples per prompt). Transform: Φ(C) chosen for
the inference-time procedure — exp(t C) for best-of-n, -exp(-t C) for worst-of-n (jailbreak),
identity for plain sampling. The transformed reward then goes to any existing RL loss, which solves
max E[Φ(C)] - beta KL (the paper's reduction of inference-aware alignment to RLHF).
"""
from __future__ import annotations

from torch import Tensor


def calibrate_rewards(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    """Empirical reference win rate of each reward. rewards [B, G], ref_rewards [B, M] -> [B, G] in [0, 1]."""
    if rewards.dim() != 2 or ref_rewards.dim() != 2 or rewards.shape[0] != ref_rewards.shape[0]:
        raise ValueError(f"calibrate_rewards needs rewards [B, G] and ref_rewards [B, M] with the same B, got "
                         f"{tuple(rewards.shape)} and {tuple(ref_rewards.shape)}")
    if ref_rewards.shape[1] == 0:
        raise ValueError("calibrate_rewards needs at least one reference sample per prompt (M >= 1)")
    below = (ref_rewards[:, None, :] < rewards[:, :, None]).to(rewards.dtype).mean(-1)  # [B, G]
    ties = (ref_rewards[:, None, :] == rewards[:, :, None]).to(rewards.dtype).mean(-1)  # [B, G]
    return below + 0.5 * ties


def transform_calibrated(calibrated: Tensor, *, kind: str = "bon", t: float = 1.0) -> Tensor:
    """Φ(C): "bon" exp(t C), "won" -exp(-t C), "identity" C. [...] -> [...]."""
    if kind == "bon":
        return (t * calibrated).exp()
    if kind == "won":
        return -(-t * calibrated).exp()
    if kind == "identity":
        return calibrated
    raise ValueError(f"unknown InfAlign transform {kind!r}; valid: bon, won, identity")


def ctrl_reward(rewards: Tensor, ref_rewards: Tensor, *, kind: str = "bon", t: float = 1.0) -> Tensor:
    """Calibrate then transform: the reward an RL loss sees for BoN-aware training, [B, G]."""
    return transform_calibrated(calibrate_rewards(rewards, ref_rewards), kind=kind, t=t)
