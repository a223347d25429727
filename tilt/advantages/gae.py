"""GAE(gamma, lambda) over a learned value model (catalogue C1, PPO).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = sum_l (gamma lambda)^l delta_{t+l}
    returns_t = A_t + V(s_t)   (the value-head target, before whitening)

Eq. 11-16 of Schulman et al., arXiv:1506.02438; recursion and masking as verl
``compute_gae_advantage_return`` (verl/trainer/ppo/core_algos.py): masked positions inside a
completion are skipped (V and the running sum carry across them); the advantages are then
whitened over all valid tokens of the batch. verl's defaults are gamma = lambda = 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import finish, masked_whiten, outcome_token_rewards
from tilt.batch import AdvantageInput


def gae_advantages_returns(token_rewards: Tensor, values: Tensor, mask: Tensor, *,
                           gamma: float = 1.0, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Raw (unwhitened) GAE advantages and returns, both [..., T] and 0 off the mask.

    Args:
        token_rewards: [..., T] dense reward (outcome at the last token plus any per-token term).
        values: [..., T] V(s_t), the value of the state before token t is emitted.
        mask: [..., T] 1 on completion tokens.
    Returns:
        (advantages, returns) with returns = advantages + values. Eq. 16, arXiv:1506.02438.
    """
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)  # [..., T]
    next_v = torch.zeros_like(values[..., 0])  # [...]
    running = torch.zeros_like(values[..., 0])  # [...]
    for t in reversed(range(values.shape[-1])):
        delta = token_rewards[..., t] + gamma * next_v - values[..., t]  # [...]
        step = delta + gamma * lam * running  # [...]
        next_v = values[..., t] * m[..., t] + (1.0 - m[..., t]) * next_v
        running = step * m[..., t] + (1.0 - m[..., t]) * running
        adv[..., t] = running
    return adv * m, (adv + values) * m


@ADVANTAGES.register("gae", needs=("values",), optional=("token_rewards",))
def gae(inp: AdvantageInput, *, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True
        ) -> tuple[Tensor, dict[str, Tensor]]:
    """GAE advantages per token from ``inp.values``; outcome reward at the last token.

    Args:
        gamma: discount; lam: GAE lambda; whiten: whiten over valid batch tokens (verl does).
    The value-head target is ``gae_advantages_returns(...)[1]``; the learner computes it with
    the same inputs (metrics carry only scalars).
    """
    if inp.values is None:
        raise ValueError("gae needs AdvantageInput.values (value-head predictions V(s_t))")
    dense = outcome_token_rewards(inp.rewards, inp.mask, inp.token_rewards)  # [B, G, T]
    adv, returns = gae_advantages_returns(dense, inp.values, inp.mask, gamma=gamma, lam=lam)
    m = inp.mask.to(adv.dtype)
    metrics = {"gae/returns_mean": (returns * m).sum() / m.sum().clamp(min=1.0)}
    if whiten:
        adv = masked_whiten(adv, inp.mask)
    return finish(adv, inp.mask, metrics)
