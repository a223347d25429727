"""Reward component: (prompts, completions, dataset columns) in, floats out.

A reward function is a plain callable ``f(prompts, completions, **columns) -> list[float]``
(TRL's convention), where each column is a list with one entry per completion. Functions are
chosen by registry name or by an importable "module:function" path.

Scoring is defensive: a function that raises, returns the wrong length or type, returns NaN/inf,
takes longer than the timeout, or crashes its process does not stop the run. Each call runs in a
worker process (``tilt.reward_pool``). The affected samples score 0, and the counts are returned
as metrics (``reward/errors``, ``reward/nonfinite``, ``reward/timeouts``, ``reward/crashes``).
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

from tilt import reward_pool
from tilt.registry import Registry

RewardFn = Callable[..., Sequence[float]]
_COUNT = {"timeout": "reward/timeouts", "crash:": "reward/crashes", "error:": "reward/errors", "bad": "reward/errors"}
REWARDS: Registry = Registry("reward function")


@REWARDS.register("verifier")
def verifier_reward(prompts: list[str], completions: list[str], *, task: list[str],
                    columns: list[dict[str, Any]], **_: Any) -> list[float]:
    """The task's own verifier: reward in [0, 1] per completion."""
    from tilt.tasks import get_task

    return [float(get_task(t).verify(c, **col)) for t, c, col in zip(task, completions, columns)]


def resolve_reward_fn(name: str) -> RewardFn:
    """A registry name, or "package.module:function" for a user-defined reward."""
    if name in REWARDS:
        return REWARDS.get(name)
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward function {name!r} could not be imported: {exc}") from exc
        if not callable(fn):
            raise ValueError(f"reward function {name!r} is not callable")
        return fn
    raise ValueError(f"unknown reward function {name!r}; valid names: {', '.join(REWARDS.names())} "
                     "or an importable 'module:function'")


def _call(fn: RewardFn, timeout: float, *args: Any, **kwargs: Any) -> tuple[list[float] | None, str]:
    """Call ``fn`` in a worker process (``tilt.reward_pool``): a call past ``timeout`` is killed, a
    crash ends only the worker; the result must be a sequence of real numbers (``as_reals``)."""
    res = reward_pool.call(fn, args, kwargs, timeout)
    if res.kind == "ok":
        return res.values, ""
    return None, {"error": "error: ", "bad_result": "bad result: "}.get(res.kind, "") + res.message


def score(fns: list[RewardFn], weights: list[float], prompts: list[str], completions: list[str],
          columns: dict[str, list[Any]], *, timeout: float) -> tuple[list[float], dict[str, float], list[str]]:
    """Weighted sum of reward functions, one float per completion.

    Returns (rewards, counts, messages). If a batch call fails, each sample is retried alone
    so one bad sample does not zero the batch; samples that still fail score 0.
    """
    n = len(completions)
    total = [0.0] * n
    counts = {"reward/errors": 0.0, "reward/nonfinite": 0.0, "reward/timeouts": 0.0, "reward/crashes": 0.0}
    messages: list[str] = []
    for fn, w in zip(fns, weights):
        vals, why = _call(fn, timeout, prompts, completions, **columns)
        if vals is not None and len(vals) != n:
            vals, why = None, f"error: returned {len(vals)} rewards for {n} completions"
        if vals is None:
            name = getattr(fn, '__name__', fn)
            if why.startswith(("timeout", "crash", "bad result")):  # would repeat per sample: count all n
                messages.append(f"{name}: {why}; its {n} samples score 0")
                counts[_COUNT[why.split()[0]]] += n
                vals = [0.0] * n
            else:
                messages.append(f"{name}: {why}; scoring samples one by one")
                vals = [_score_one(fn, timeout, prompts, completions, columns, i, counts) for i in range(n)]
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                counts["reward/nonfinite"] += 1
                v = 0.0
            total[i] += w * v
    return total, counts, messages


def _score_one(fn: RewardFn, timeout: float, prompts: list[str], completions: list[str],
               columns: dict[str, list[Any]], i: int, counts: dict[str, float]) -> float:
    cols = {k: [v[i]] for k, v in columns.items()}
    vals, why = _call(fn, timeout, [prompts[i]], [completions[i]], **cols)
    if vals is None or len(vals) != 1:
        counts[_COUNT.get(why.split()[0], "reward/errors") if why else "reward/errors"] += 1
        return 0.0
    return vals[0]
