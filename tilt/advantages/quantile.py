"""QAE: Quantile Advantage Estimation for Entropy-Safe Reasoning (catalogue C2), arXiv:2509.22611.

The group mean baseline of GRPO/DAPO is replaced by the group's K-quantile:

    A_i = (r_i - Q_K({r_j})) / (std_g r + eps)        (std division as the authors' DAPO recipe)

With the empirical quantile Q_K = inf{ z : F_hat(z) >= K } and binary rewards at success rate p,
Q_K = 0 when p <= 1 - K (only successes get signal, A > 0) and Q_K = 1 when p > 1 - K (only
failures get signal, A < 0): the paper's two-regime gate. The authors' code
(github.com/junkangwu/QAE, verl core_algos) calls ``torch.quantile`` with linear interpolation,
which can fall between 0 and 1 near p = 1 - K; ``interpolation="linear"`` reproduces it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import finish, per_token
from tilt.batch import AdvantageInput

INTERPOLATIONS = ("lower", "linear")


def group_quantile(rewards: Tensor, k: float, *, interpolation: str = "lower") -> Tensor:
    """The K-quantile of each group's rewards, [B, G] -> [B, 1].

    "lower": the inverse empirical CDF inf{z : #{r_j <= z} / G >= K}, i.e. the ceil(K G)-th
    smallest reward (the 1st for K G <= 1). "linear": torch.quantile's default.
    """
    if not 0.0 < k < 1.0:
        raise ValueError(f"quantile K must be in (0, 1), got {k}")
    if interpolation == "linear":
        return torch.quantile(rewards, k, dim=1, keepdim=True)
    if interpolation != "lower":
        valid = ", ".join(INTERPOLATIONS)
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {valid}")
    G = rewards.shape[1]
    rank = min(max(math.ceil(k * G - 1e-9), 1), G)  # 1-based rank of the quantile
    return rewards.sort(dim=1).values[:, rank - 1: rank]  # [B, 1]


@ADVANTAGES.register("qae", needs=(), optional=())
def qae(inp: AdvantageInput, *, k: float = 0.4, scale: bool = True, eps: float = 1e-6,
        interpolation: str = "lower") -> tuple[Tensor, dict[str, Tensor]]:
    """QAE advantage A_i = (r_i - Q_K) / (std_g r + eps) on every token of completion i.

    Args:
        k: the quantile K (paper's scripts use 0.4).
        scale: divide by the unbiased group std + eps as the reference DAPO recipe does.
        eps: added to the std (verl's 1e-6).
        interpolation: "lower" (paper's definition, exact gate) or "linear" (torch.quantile).
    Reference: arXiv:2509.22611 (the group-wise K-quantile baseline).
    """
    r = inp.rewards  # [B, G]
    seq = r - group_quantile(r, k, interpolation=interpolation)  # [B, G]
    if scale:
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.ones_like(r[:, :1])  # [B, 1]
        seq = seq / (std + eps)
    pos = (seq > 0).to(r.dtype).mean()
    neg = (seq < 0).to(r.dtype).mean()
    return finish(per_token(seq, inp.mask), inp.mask, {"qae/pos_frac": pos, "qae/neg_frac": neg})
