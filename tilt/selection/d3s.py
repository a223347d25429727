"""D3S: Dynamic Dual-Level Down-Sampling (catalogue D2), arXiv:2509.22115.

* sample level: keep, in each group, the k rollouts whose advantages have the largest variance
  (the paper ties Var(A) to an upper bound on the policy-gradient norm);
* token level: among the kept rollouts' tokens, keep the top fraction by |A_{i,t}| * H_{i,t};
* schedule: start aggressive (small fractions) and relax toward keeping everything.

Max-variance subset, exact in O(G k): some optimal k-subset of reals is "the j smallest and the
k - j largest" for some j. Proof: k^2 Var(S) = k sum x^2 - (sum x)^2 is, as a function of any
one member x with the other k - 1 fixed, a convex quadratic (coefficient k - 1 > 0), so that
member must be at least as good as every excluded value, and a convex function on a set of
reals is largest at its minimum or maximum: each member lies below all excluded values or above
all of them. Enumerating j = 0..k therefore finds the optimum (tested against brute force).

The schedule's shape is ours (linear from ``start`` to ``end`` over ``total_steps``); the paper
only states that it starts aggressive and relaxes (curriculum-style).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from tilt.selection import SELECTORS


def max_variance_subset(values: Tensor, k: int) -> Tensor:
    """bool [B, G]: per row, a k-subset of ``values`` [B, G] with the largest variance."""
    B, G = values.shape
    if k >= G:
        return torch.ones_like(values, dtype=torch.bool)
    if k < 1:
        raise ValueError(f"subset size k must be >= 1, got {k}")
    sorted_v, order = values.sort(dim=1)  # [B, G] ascending
    zero = sorted_v.new_zeros(B, 1)
    c1 = torch.cat([zero, sorted_v.cumsum(1)], dim=1)  # [B, G+1] prefix sums
    c2 = torch.cat([zero, (sorted_v ** 2).cumsum(1)], dim=1)  # [B, G+1]
    j = torch.arange(k + 1, device=values.device)  # j smallest + (k - j) largest
    s1 = c1[:, j] + c1[:, G:G + 1] - c1[:, G - (k - j)]  # [B, k+1]
    s2 = c2[:, j] + c2[:, G:G + 1] - c2[:, G - (k - j)]  # [B, k+1]
    var = s2 / k - (s1 / k) ** 2  # [B, k+1] population variance of each candidate
    best = var.argmax(dim=1, keepdim=True)  # [B, 1]
    pos = torch.arange(G, device=values.device).expand(B, G)  # sorted positions
    keep_sorted = (pos < best) | (pos >= G - (k - best))  # [B, G]
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep


def top_tokens(scores: Tensor, mask: Tensor, *, keep_frac: float) -> Tensor:
    """bool like ``mask``: the ceil(keep_frac * n) highest-score valid tokens of the whole batch."""
    valid = (mask > 0).reshape(-1)
    n = int(valid.sum())
    keep_n = min(n, math.ceil(keep_frac * n - 1e-9))
    flat = scores.reshape(-1)
    flat = torch.where(valid, flat, torch.full_like(flat, -float("inf")))
    keep = torch.zeros_like(valid)
    if keep_n > 0:
        keep[flat.topk(keep_n).indices] = True
    return keep.reshape(mask.shape) & (mask > 0)


def d3s_schedule(step: int, *, total_steps: int, start: float, end: float = 1.0) -> float:
    """Keep fraction at ``step``: linear from ``start`` (step 0) to ``end`` (step >= total)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start + (end - start) * progress


def d3s(adv: Tensor, mask: Tensor, entropy: Tensor, *, step: int, total_steps: int,
        sample_start: float = 0.5, token_start: float = 0.5, end: float = 1.0,
        min_samples: int = 2) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Dual-level down-sampling of one batch.

    Args:
        adv: [B, G, T] per-token advantages; the sample level uses each completion's masked
            mean advantage A_i. mask: [B, G, T]. entropy: [B, G, T] H_{i,t} of the policy.
        step, total_steps: position in training for the schedule.
        sample_start, token_start: keep fractions at step 0 (relaxed linearly to ``end``).
        min_samples: keep at least this many rollouts per group.
    Returns:
        (keep [B, G], token_keep [B, G, T], metrics) with
        select/samples_kept = sum keep / (B G);  select/tokens_kept = sum token_keep / sum mask.
    """
    m = mask.to(adv.dtype)
    G = adv.shape[1]
    seq = (adv * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B, G]
    frac_s = d3s_schedule(step, total_steps=total_steps, start=sample_start, end=end)
    k = min(G, max(min_samples, math.ceil(frac_s * G - 1e-9)))
    keep = max_variance_subset(seq, k)  # [B, G]
    frac_t = d3s_schedule(step, total_steps=total_steps, start=token_start, end=end)
    score = adv.abs() * entropy.to(adv.dtype)  # [B, G, T] |A| * H
    token_keep = top_tokens(score, m * keep.unsqueeze(-1).to(m.dtype), keep_frac=frac_t)
    metrics = {
        "select/samples_kept": keep.to(adv.dtype).mean(),
        "select/tokens_kept": token_keep.to(adv.dtype).sum() / m.sum().clamp(min=1.0),
    }
    return keep, token_keep, metrics


def d3s_filter(batch, ctx, **kwargs) -> tuple[Any, dict[str, float]]:
    """D3S on a LearnerBatch: drop unkept rollouts and mask unkept tokens out of the loss (the
    token choice becomes ``loss_mask``; attention still sees every token). The schedule runs on
    (step - 1) / total_steps, so step 1 uses the start fractions."""
    B, G, T = ctx.adv.shape
    mask = batch.completion_mask.view(B, G, T).float()  # [B, G, T]
    keep, token_keep, m = d3s(ctx.adv, mask, ctx.entropy.view(B, G, T), step=ctx.step - 1,
                              total_steps=ctx.total_steps, **kwargs)
    loss_mask = token_keep.reshape(B * G, T).to(batch.completion_mask.dtype)  # [N, T]
    rows = keep.reshape(-1).nonzero().squeeze(-1)  # kept rows, group-major
    return replace(batch, loss_mask=loss_mask).select(rows), {k: float(v) for k, v in m.items()}


SELECTORS.register("d3s", level="token", needs=("entropy",), loop_args=("step", "total_steps"),
                   apply=d3s_filter)(d3s)
