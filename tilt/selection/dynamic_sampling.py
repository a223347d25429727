"""DAPO dynamic sampling (catalogue D1), arXiv:2503.14476 Sec. 3.2.

A group whose G rewards are all equal has zero group-relative advantage and gives no gradient;
DAPO drops such groups and keeps drawing until the batch is full of informative groups, up to a
limit on the number of generation rounds (verl's ``max_num_gen_batches``). ``oversample``
draws more prompts than the batch still needs (verl's ``gen_batch_size`` above
``train_batch_size``), so one generation call usually fills the batch; surplus kept groups are
discarded, as in verl.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tilt.selection import SELECTORS

DrawFn = Callable[[int], tuple[Tensor, Sequence[Any]]]


def keep_groups(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """bool [B]: True for groups whose rewards are not all equal (max - min > eps).

    DAPO's constraint 0 < |{o_i : is_equivalent(a, o_i)}| < G, generalised to any reward.
    """
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) > eps  # [B]


def check_refill_args(*, batch_size: int = 1, max_draws: int = 1, oversample: float = 1.0) -> None:
    """ValueError naming the argument unless batch_size >= 1, max_draws >= 1 and oversample >= 1."""
    if max_draws < 1 or batch_size < 1:
        raise ValueError(f"refill needs max_draws >= 1 and batch_size >= 1, got {max_draws}, {batch_size}")
    if not oversample >= 1.0:
        raise ValueError(f"refill needs oversample >= 1 (a factor on the groups still missing), got {oversample}")


def refill(draw_fn: DrawFn, *, batch_size: int, max_draws: int, eps: float = 1e-6,
           fill_with_dropped: bool = True, oversample: float = 1.0) -> tuple[Tensor, list[Any], dict[str, Tensor]]:
    """Merge successive draws until ``batch_size`` informative groups are kept.

    Args:
        draw_fn: ``draw_fn(n) -> (rewards [n', G], items)`` draws n more groups (n' may differ
            from n); ``items`` holds whatever the caller needs per group (e.g. its rollout).
        batch_size: number of groups to return.
        max_draws: limit on calls to ``draw_fn``. While it lasts no zero-variance group is
            returned. Once it is spent with the batch still short, the batch is topped up with
            dropped groups (``fill_with_dropped``) or returned short, and the metrics say so.
        oversample: each draw asks for ``ceil(oversample * deficit)`` groups (>= 1; 1 draws
            exactly the deficit). Kept groups beyond ``batch_size`` are discarded.
    Returns:
        (rewards [n, G], items of the n returned groups in draw order, metrics) with
        select/groups_dropped   number of drawn groups with all-equal rewards
        select/groups_dropped_frac  that number / groups drawn
        select/draws            calls to draw_fn
        select/exhausted        1 if the limit was spent before the batch was full, else 0
        select/zero_var_returned  zero-variance groups in the returned batch
    """
    check_refill_args(batch_size=batch_size, max_draws=max_draws, oversample=oversample)
    kept: list[tuple[Tensor, Any]] = []
    dropped: list[tuple[Tensor, Any]] = []
    draws = drawn = 0
    while len(kept) < batch_size and draws < max_draws:
        rewards, items = draw_fn(math.ceil(oversample * (batch_size - len(kept)) - 1e-9))
        draws += 1
        drawn += len(items)
        keep = keep_groups(rewards, eps=eps)  # [n']
        for i, item in enumerate(items):
            (kept if bool(keep[i]) else dropped).append((rewards[i], item))
    exhausted = len(kept) < batch_size
    out = kept[:batch_size]
    if exhausted and fill_with_dropped:
        out = out + dropped[: batch_size - len(out)]
    if not out:
        raise ValueError("refill: draw_fn returned no groups")
    metrics = {
        "select/groups_dropped": torch.tensor(float(len(dropped))),
        "select/groups_dropped_frac": torch.tensor(len(dropped) / max(drawn, 1)),
        "select/draws": torch.tensor(float(draws)),
        "select/exhausted": torch.tensor(float(exhausted)),
        "select/zero_var_returned": torch.tensor(float(len(out) - min(len(kept), batch_size))),
    }
    return torch.stack([r for r, _ in out]), [item for _, item in out], metrics


def draw_informative_groups(draw: Callable[[int], Any], *, batch_size: int, pad_id: int, max_draws: int = 4,
                            eps: float = 1e-6, fill_with_dropped: bool = True, oversample: float = 1.0
                            ) -> tuple[Any, dict[str, float]]:
    """The step's groups with DAPO dynamic sampling: ``draw(n)`` samples and scores n prompts'
    groups (a ``tilt.wiring.sampling.Scored``); groups whose G rewards are all equal are dropped
    and more are drawn (``refill``). Reward counts and messages add up over all draws."""
    from tilt.wiring.sampling import merge_scored

    counts: dict[str, float] = {}
    messages: list[str] = []

    def draw_fn(n: int) -> tuple[Tensor, list[Any]]:
        sc = draw(n)
        for k, v in sc.rstats.items():
            counts[k] = counts.get(k, 0.0) + v
        messages.extend(sc.messages)
        return sc.rewards.view(len(sc.items), sc.group_size), [sc.group(i) for i in range(len(sc.items))]

    _, groups, metrics = refill(draw_fn, batch_size=batch_size, max_draws=max_draws, eps=eps,
                                fill_with_dropped=fill_with_dropped, oversample=oversample)
    merged = replace(merge_scored(groups, pad_id=pad_id), rstats=counts, messages=messages)
    return merged, {k: float(v) for k, v in metrics.items()}


# The selector acts while drawing (meta ``draw``); its settings are refill's keywords.
SELECTORS.register("dynamic_sampling", level="group", needs=(), kwargs_of=refill, loop_args=("draw_fn", "batch_size"),
                   check=check_refill_args, draw=draw_informative_groups)(keep_groups)
