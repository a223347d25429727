"""Shared pieces of the advantage estimators: broadcasting, whitening, outcome placement, metrics.

Shapes: B prompts x G completions x T tokens; ``mask`` is 1 on completion tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

ZERO_TOL = 1e-8  # |A| below this counts as "no signal" in adv/zero_frac


def per_token(seq_adv: Tensor, mask: Tensor) -> Tensor:
    """Spread a sequence-level advantage [B, G] over the completion's tokens -> [B, G, T]."""
    return seq_adv.unsqueeze(-1) * mask.to(seq_adv.dtype)  # [B, G, T]


def zero_frac(adv: Tensor, mask: Tensor) -> Tensor:
    """Fraction of completions with max_t |A_t| * m_t < 1e-8 (empty completions count as zero).

    adv/zero_frac = (1 / (B*G)) * sum_{b,g} 1[ max_t |A_{b,g,t}| m_{b,g,t} < 1e-8 ]
    """
    peak = (adv.abs() * mask.to(adv.dtype)).amax(dim=-1)  # [B, G]
    return (peak < ZERO_TOL).to(adv.dtype).mean()


def finish(adv: Tensor, mask: Tensor, metrics: dict[str, Tensor] | None = None
           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Zero ``adv`` off the mask, detach, and add ``adv/zero_frac`` to ``metrics``."""
    adv = (adv * mask.to(adv.dtype)).detach()  # [B, G, T]
    out = {"adv/zero_frac": zero_frac(adv, mask)}
    out.update(metrics or {})
    return adv, out


def masked_whiten(x: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and Bessel-corrected var over ALL valid tokens.

    As ``verl.utils.torch_functional.masked_whiten`` (shift_mean=True). With fewer than two
    valid tokens the variance is taken as 0. Returns x's shape, 0 off the mask.
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * m).sum() / (n - 1.0).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * m


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last valid token of each completion, [...]; -1 for an empty completion."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)  # [..., T]
    return torch.where(mask > 0, pos, torch.full_like(pos, -1)).amax(dim=-1)  # [...]


def outcome_token_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None = None
                          ) -> Tensor:
    """Dense reward [B, G, T]: the outcome reward at the last valid token, plus ``token_rewards``
    (e.g. a KL penalty placed in the reward) on every valid token."""
    m = mask.to(rewards.dtype)
    last = last_token_index(mask)  # [B, G]
    onehot = torch.nn.functional.one_hot(last.clamp(min=0), mask.shape[-1]).to(rewards.dtype)
    present = (last >= 0).unsqueeze(-1).to(rewards.dtype)  # [B, G, 1] 0 for an empty completion
    dense = onehot * present * rewards.unsqueeze(-1)  # [B, G, T]
    if token_rewards is not None:
        dense = dense + token_rewards.to(rewards.dtype) * m
    return dense


def leave_one_out_mean(x: Tensor) -> Tensor:
    """mean_{j != i} x_j along the last axis (size G >= 2), [..., G]."""
    G = x.shape[-1]
    if G < 2:
        raise ValueError(f"a leave-one-out baseline needs >= 2 completions per group, got {G}")
    return (x.sum(dim=-1, keepdim=True) - x) / (G - 1)
