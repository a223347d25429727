"""CANON: Conditional Advantage Estimation (catalogue C3), arXiv:2509.23962.

Each group is sorted by a target metric (mean token entropy, or length) and split at the median
into a low half L (the floor(G/2) smallest) and a high half H (the rest). For completion i in
half S, with S' the other half and mean_X the mean reward of half X:

    A_inter = r_i - mean_{S'}        (inter-group: which metric trend pays off)
    A_intra = r_i - mean_S           (intra-group: the better response within the same trend)
    A_i     = mu A_inter + (1 - mu) A_intra                              (Eq. 5, mu = 1 default)

Summed over a half, A_inter gives |S| (mean_S - mean_S'): the half whose trend earns more reward
is pushed up, the other down, without presuming the direction. With equal halves, mu = 1/2 gives
r_i - mean_g r, i.e. Dr. GRPO. Split, tie order (stable sort) and combination follow the
authors' verl code (github.com/biuboomc/CANON, compute_dr_entropy_per_token_group_outcome_advantage,
alpha = 1, beta = 0); its division by the generation budget is left to the loss reduction
(tilt.reduction "seq-mean-token-sum-norm").
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import finish, per_token
from tilt.batch import AdvantageInput

METRICS = ("entropy", "length")


def regroup_metric(inp: AdvantageInput, metric: str) -> Tensor:
    """The per-completion metric [B, G]: mean token entropy over the mask, or token count."""
    m = inp.mask.to(inp.rewards.dtype)
    if metric == "length":
        return m.sum(dim=-1)
    if metric == "entropy":
        if inp.entropy is None:
            raise ValueError("canon with metric='entropy' needs AdvantageInput.entropy")
        return (inp.entropy.to(m.dtype) * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
    raise ValueError(f"unknown canon metric {metric!r}; valid: {', '.join(METRICS)}")


def high_half(metric: Tensor) -> Tensor:
    """bool [B, G]: True for the completions in the high-metric half (stable sort, the
    ceil(G/2) largest; ties keep their original order)."""
    B, G = metric.shape
    order = torch.sort(metric, dim=1, stable=True).indices  # [B, G] ascending
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(G, device=metric.device).expand(B, G))
    return rank >= G // 2


@ADVANTAGES.register("canon", needs=lambda kw: ("entropy",) if kw.get("metric", "entropy") == "entropy" else (),
                     optional=())
def canon(inp: AdvantageInput, *, metric: str = "entropy", mu: float = 1.0
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """CANON advantage on every token of completion i (see module docstring).

    Args:
        metric: "entropy" (needs inp.entropy) or "length".
        mu: weight of the inter-group term (Eq. 5 of arXiv:2509.23962; authors' default 1).
    Needs G >= 2.
    """
    r = inp.rewards  # [B, G]
    if r.shape[1] < 2:
        raise ValueError("canon needs at least 2 completions per group")
    high = high_half(regroup_metric(inp, metric)).to(r.dtype)  # [B, G]
    low = 1.0 - high
    mean_high = (r * high).sum(1, keepdim=True) / high.sum(1, keepdim=True)  # [B, 1]
    mean_low = (r * low).sum(1, keepdim=True) / low.sum(1, keepdim=True)  # [B, 1]
    other = high * mean_low + low * mean_high  # [B, G] mean of the other half
    own = high * mean_high + low * mean_low  # [B, G] mean of the own half
    seq = mu * (r - other) + (1.0 - mu) * (r - own)  # [B, G]
    gap = (mean_high - mean_low).mean()
    return finish(per_token(seq, inp.mask), inp.mask, {"canon/high_minus_low": gap})
