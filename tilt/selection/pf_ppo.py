"""PF-PPO: policy filtration of unreliable rewards (catalogue D3), arXiv:2409.06957.

A learned reward model is more reliable on some responses than on others, so of the N responses
drawn per prompt only some are trained on:

    best_of_n    the highest-reward response
    best_random  the highest-reward response and one other chosen uniformly at random
    best_worst   the highest- and the lowest-reward response
    all          no filtering (the PPO baseline)

The strategy is chosen by the coefficient of determination R^2 between the rewards and the
actual scores (e.g. unit-test pass rates) on the samples each strategy keeps.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tilt.selection import SELECTORS

STRATEGIES = ("best_of_n", "best_random", "best_worst", "all")


def pf_filter(rewards: Tensor, *, strategy: str = "best_random",
              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """bool [B, G] of the samples kept by ``strategy`` (ties: the first index wins).

    Returns (keep, {"select/samples_kept": sum keep / (B G)}).
    """
    B, G = rewards.shape
    best = rewards.argmax(dim=1, keepdim=True)  # [B, 1]
    keep = torch.zeros_like(rewards, dtype=torch.bool).scatter_(1, best, True)
    if strategy == "all":
        keep[:] = True
    elif strategy in ("best_worst", "best_random") and G > 1:
        others = keep.logical_not()
        if strategy == "best_worst":
            key = torch.where(others, -rewards, torch.full_like(rewards, -float("inf")))
        else:
            u = torch.rand(B, G, generator=generator, dtype=rewards.dtype)
            key = torch.where(others, u, torch.full_like(u, -float("inf")))
        keep.scatter_(1, key.argmax(dim=1, keepdim=True), True)
    elif strategy not in STRATEGIES:
        raise ValueError(f"unknown pf_ppo strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    return keep, {"select/samples_kept": keep.to(rewards.dtype).mean()}


def pf_filter_batch(batch, ctx, **kwargs) -> tuple[Any, dict[str, float]]:
    """PF-PPO on a LearnerBatch: keep only the rollouts the strategy selects (``ctx.rewards`` [B, G],
    ``ctx.generator``); advantages were computed on the full groups before."""
    keep, m = pf_filter(ctx.rewards, generator=ctx.generator, **kwargs)  # [B, G]
    rows = keep.reshape(-1).nonzero().squeeze(-1)
    return batch.select(rows), {k: float(v) for k, v in m.items()}


SELECTORS.register("pf_ppo", level="sample", needs=(), loop_args=("generator",), apply=pf_filter_batch)(pf_filter)


def r_squared(x: Tensor, y: Tensor) -> Tensor:
    """R^2 of the least-squares line y ~ a + b x: 1 - SS_res / SS_tot (= corr(x, y)^2).

    Returns 0 when y or x is constant (the line explains nothing beyond the mean)."""
    x, y = x.reshape(-1).to(torch.float64), y.reshape(-1).to(torch.float64)
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (dx * dx).sum(), (dy * dy).sum(), (dx * dy).sum()
    if sxx <= 0 or syy <= 0:
        return torch.zeros((), dtype=torch.float64)
    return sxy ** 2 / (sxx * syy)


def choose_strategy(rewards: Tensor, scores: Tensor, *,
                    strategies: tuple[str, ...] = ("best_of_n", "best_random", "best_worst"),
                    generator: torch.Generator | None = None) -> tuple[str, dict[str, float]]:
    """The strategy whose kept samples have the highest R^2(reward, actual score).

    Args:
        rewards: [B, G] reward-model scores; scores: [B, G] actual scores (ground truth).
    Returns:
        (best strategy name, {name: R^2 on its kept samples pooled over the batch}).
    """
    r2 = {}
    for name in strategies:
        keep, _ = pf_filter(rewards, strategy=name, generator=generator)
        r2[name] = float(r_squared(rewards[keep], scores[keep]))
    return max(r2, key=r2.get), r2
