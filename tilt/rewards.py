"""Reward component: (prompts, completions, dataset columns) in, floats out.

A reward function is called exactly as ``trl.GRPOTrainer._calculate_rewards`` (TRL 1.16) calls
it, all by keyword: ``f(prompts=, completions=, completion_ids=, **columns, trainer_state=,
log_extra=, log_metric=) -> list[float]``. Each column of the dataset except the prompt (and
``completion`` / ``completion_ids``) is a list with one entry per completion. ``prompts`` are
strings, or lists of {role, content} messages for a conversational dataset, whose
``completions`` are then ``[{"role": "assistant", "content": text}]``. Functions are chosen by
registry name, an importable "module:function", or a file "path/to/rewards.py:function".

Scoring is defensive: a function that raises, returns the wrong length or type, returns NaN/inf,
takes longer than the timeout, or crashes its process does not stop the run. Each call runs in a
worker process (``tilt.reward_pool``); what the function logs through ``log_metric`` comes back with
its result. The affected samples score 0, and the counts are returned as metrics
(``reward/errors``, ``reward/nonfinite``, ``reward/timeouts``, ``reward/crashes``).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tilt import reward_pool
from tilt.reward_state import RewardState
from tilt.registry import Registry

RewardFn = Callable[..., Sequence[float]]
REWARDS: Registry = Registry("reward function")
_COUNT = {"timeout": "reward/timeouts", "crash:": "reward/crashes", "error:": "reward/errors", "bad": "reward/errors"}


@REWARDS.register("verifier")
def verifier_reward(prompts: list[str], completions: list[str], *, task: list[str],
                    columns: list[dict[str, Any]], **_: Any) -> list[float]:
    """The built-in task's own verifier: reward in [0, 1] per completion. Reads the procedural
    source's ``task`` and ``columns`` columns (tilt.tasks.base.Item.reward_columns)."""
    from tilt.tasks import get_task

    return [float(get_task(t).verify(c, **col)) for t, c, col in zip(task, completions, columns)]


def _import_module(mod: str, spec: str):
    if mod.endswith(".py"):
        path = Path(mod).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {str(path)!r} does not exist")
        name = f"tilt_user_rewards_{abs(hash(str(path)))}"
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(mod)


def resolve_reward_fn(name: str) -> RewardFn:
    """A registry name, "name=argument" for a parametrised entry (e.g. "reward_model=/path"),
    "package.module:function", or "path/to/file.py:function"."""
    head, eq, arg = name.partition("=")
    meta = REWARDS.entry(head).meta if head in REWARDS else {}
    if "factory" in meta and (eq or meta.get("needs_arg")):
        if not arg:
            raise ValueError(f"reward function {head!r} needs an argument: '{head}={meta.get('arg', '...')}'")
        return meta["factory"](arg)
    if name in REWARDS:
        return REWARDS.get(name)
    if ":" in name:
        mod, _, attr = name.rpartition(":")
        try:
            module = _import_module(mod, name)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user module may fail in any way while importing
            raise ValueError(f"reward function {name!r}: module {mod!r} could not be imported: "
                             f"{type(exc).__name__}: {exc}") from exc
        fn = getattr(module, attr, None)
        if fn is None:
            raise ValueError(f"reward function {name!r}: module {mod!r} has no attribute {attr!r}")
        if not callable(fn):
            raise ValueError(f"reward function {name!r} is not callable")
        return fn
    raise ValueError(f"unknown reward function {name!r}; valid names: {', '.join(REWARDS.names())}, "
                     "an importable 'module:function' or 'path/to/file.py:function'")


def check_signature(fn: RewardFn, columns: Sequence[str]) -> None:
    """ValueError unless ``fn`` accepts the keywords tilt (like TRL) passes it: prompts,
    completions, completion_ids, every column, trainer_state, log_extra, log_metric."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call decide
    names = ["prompts", "completions", "completion_ids", *columns, *EXTRA_KWARGS]
    if fn is verifier_reward and not {"task", "columns"} <= set(columns):
        raise ValueError("reward function 'verifier' scores the built-in tasks only (it reads their task and "
                         f"columns columns; this dataset has {', '.join(columns)}); give your own with --reward "
                         "module:function or reward.functions")
    try:
        sig.bind(**{k: None for k in names})
    except TypeError as exc:
        raise ValueError(
            f"reward function {getattr(fn, '__name__', fn)!r}{sig} cannot be called as TRL and tilt call it, "
            f"with keywords {', '.join(names)}: {exc}. Write it as f(prompts, completions, **kwargs) and read "
            "columns from kwargs") from None


EXTRA_KWARGS = ("trainer_state", "log_extra", "log_metric")


def completions_as(prompts: Sequence[Any], texts: list[str]) -> list[Any]:
    """Completions in the prompts' format: strings, or ``[{"role": "assistant", "content": t}]``
    after conversational prompts (as TRL 1.16 decodes them without a response parser)."""
    if prompts and isinstance(prompts[0], list):
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def _call(fn: RewardFn, timeout: float, **kwargs: Any) -> tuple[list[float] | None, str]:
    """Call ``fn`` by keyword in a worker process (``tilt.reward_pool``): a call past ``timeout`` is
    killed, a crash ends only the worker; the result must be a sequence of real numbers (``as_reals``;
    None entries become NaN, as TRL)."""
    res = reward_pool.call(fn, (), kwargs, timeout)
    if res.kind == "ok":
        return res.values, ""
    return None, {"error": "error: ", "bad_result": "bad result: "}.get(res.kind, "") + res.message


def score(fns: list[RewardFn], weights: list[float], prompts: list[Any], completions: list[str],
          columns: dict[str, list[Any]], *, timeout: float, completion_ids: Optional[list[list[int]]] = None,
          trainer_state: Optional[RewardState] = None) -> tuple[list[float], dict[str, float], list[str]]:
    """Weighted sum of reward functions, one float per completion.

    ``prompts`` are as the dataset holds them (strings or message lists); ``completions`` are
    the decoded texts, passed on in the prompts' format (``completions_as``); ``columns`` are the
    rows' other columns. Returns (rewards, counts, messages). If a batch call fails, each sample
    is retried alone so one bad sample does not zero the batch; samples that still fail score 0.
    """
    n = len(completions)
    total = [0.0] * n
    counts = {"reward/errors": 0.0, "reward/nonfinite": 0.0, "reward/timeouts": 0.0, "reward/crashes": 0.0}
    messages: list[str] = []
    state = trainer_state or RewardState()
    extra = {"trainer_state": state, "log_extra": state.log_extra, "log_metric": state.log_metric}
    kw = {"prompts": list(prompts), "completions": completions_as(prompts, completions),
          "completion_ids": completion_ids, **columns, **extra}
    for fn, w in zip(fns, weights):
        vals, why = _call(fn, timeout, **kw)
        if vals is not None and len(vals) != n:
            vals, why = None, f"error: returned {len(vals)} rewards for {n} completions"
        if vals is None:
            name = getattr(fn, "__name__", fn)
            if why.startswith(("timeout", "crash", "bad result")):  # would repeat per sample: count all n
                messages.append(f"{name}: {why}; its {n} samples score 0")
                counts[_COUNT[why.split()[0]]] += n
                vals = [0.0] * n
            else:
                messages.append(f"{name}: {why}; scoring samples one by one")
                vals = [_score_one(fn, timeout, kw, i, counts) for i in range(n)]
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                counts["reward/nonfinite"] += 1
                v = 0.0
            total[i] += w * v
    return total, counts, messages


def _score_one(fn: RewardFn, timeout: float, kw: dict[str, Any], i: int, counts: dict[str, float]) -> float:
    one = {k: (v if k in EXTRA_KWARGS or v is None else [v[i]]) for k, v in kw.items()}
    vals, why = _call(fn, timeout, **one)
    if vals is None or len(vals) != 1:
        counts[_COUNT.get(why.split()[0], "reward/errors") if why else "reward/errors"] += 1
        return 0.0
    return vals[0]


from tilt.verifiers import code_exec, maths, reasoning_gym_source, reward_model  # noqa: E402,F401 - registers them
