"""Reward component: (prompts, completions, dataset columns) in, floats out.

A reward function is a plain callable ``f(prompts, completions, **columns) -> list[float]``
(TRL's convention), where each column is a list with one entry per completion. Functions are
chosen by registry name or by an importable "module:function" path.

Scoring is defensive: a function that raises, returns the wrong length, returns NaN/inf, or
takes longer than the timeout does not stop the run. The affected samples score 0, and the
counts are returned as metrics (``reward/errors``, ``reward/nonfinite``, ``reward/timeouts``).
"""
from __future__ import annotations

import importlib
import math
import threading
from typing import Any, Callable, Sequence

from tilt.registry import Registry

RewardFn = Callable[..., Sequence[float]]
REWARDS: Registry = Registry("reward function")


@REWARDS.register("verifier")
def verifier_reward(prompts: list[str], completions: list[str], *, task: list[str],
                    columns: list[dict[str, Any]], **_: Any) -> list[float]:
    """The task's own verifier: reward in [0, 1] per completion."""
    from tilt.tasks import get_task

    return [float(get_task(t).verify(c, **col)) for t, c, col in zip(task, completions, columns)]


def resolve_reward_fn(name: str) -> RewardFn:
    """A registry name, "name=argument" for a parametrised entry (e.g. "reward_model=/path"), or
    "package.module:function" for a user-defined reward."""
    head, eq, arg = name.partition("=")
    meta = REWARDS.entry(head).meta if head in REWARDS else {}
    if "factory" in meta and (eq or meta.get("needs_arg")):
        if not arg:
            raise ValueError(f"reward function {head!r} needs an argument: '{head}={meta.get('arg', '...')}'")
        return meta["factory"](arg)
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
    """Call ``fn`` in its own daemon thread; a call still running after ``timeout`` is abandoned
    (Python cannot kill a thread) and cannot block later calls or the interpreter's exit."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any user error is counted, not fatal
            box["err"] = exc

    worker = threading.Thread(target=run, name="tilt-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return None, "timeout"
    if "err" in box:
        exc = box["err"]
        return None, f"error: {type(exc).__name__}: {exc}"
    out = box.get("out")
    try:
        vals = [float(v) for v in out]
    except (TypeError, ValueError) as exc:
        return None, f"error: returned {type(out).__name__} that is not a list of numbers ({exc})"
    return vals, ""


def score(fns: list[RewardFn], weights: list[float], prompts: list[str], completions: list[str],
          columns: dict[str, list[Any]], *, timeout: float) -> tuple[list[float], dict[str, float], list[str]]:
    """Weighted sum of reward functions, one float per completion.

    Returns (rewards, counts, messages). If a batch call fails, each sample is retried alone
    so one bad sample does not zero the batch; samples that still fail score 0.
    """
    n = len(completions)
    total = [0.0] * n
    counts = {"reward/errors": 0.0, "reward/nonfinite": 0.0, "reward/timeouts": 0.0}
    messages: list[str] = []
    for fn, w in zip(fns, weights):
        vals, why = _call(fn, timeout, prompts, completions, **columns)
        if vals is not None and len(vals) != n:
            vals, why = None, f"error: returned {len(vals)} rewards for {n} completions"
        if vals is None:
            messages.append(f"{getattr(fn, '__name__', fn)}: {why}; scoring samples one by one")
            if why == "timeout":  # do not wait n more timeouts on a hung function
                counts["reward/timeouts"] += n
                vals = [0.0] * n
            else:
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
        counts["reward/timeouts" if why == "timeout" else "reward/errors"] += 1
        return 0.0
    return vals[0]


from tilt.verifiers import code_exec, maths, reasoning_gym_source, reward_model  # noqa: E402,F401 - registers them
