"""``math_verify`` and ``format`` rewards.

``math_verify`` (the reward TRL and open-r1 use): the gold answer (column ``solution``, else
``answer``) and the completion are both parsed by the ``math-verify`` package (boxed answers,
LaTeX, plain numbers) and compared symbolically: 1.0 if equivalent (``\\frac{1}{2}`` = ``0.5``
= ``\\boxed{\\dfrac{2}{4}}``), else 0.0. math-verify's own ``signal.alarm`` timeouts only work
in the main thread and tilt calls rewards in a worker thread, so they are turned off here;
``reward.timeout_s`` bounds the call instead.

``format``: 1.0 if the completion matches a regular expression as a whole, else 0.0; the
default asks for ``<think>...</think><answer>...</answer>`` (whitespace between and around allowed).
"""
from __future__ import annotations

import re
from typing import Any, Callable

from tilt.config import ConfigError
from tilt.rewards import REWARDS
from tilt.verifiers.columns import column

DEFAULT_FORMAT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def _math_verify():
    try:
        import math_verify
    except ImportError as exc:
        raise ImportError("the math_verify reward needs the `math-verify` package: "
                          "pip install 'tilt[math]'") from exc
    return math_verify


def parse_gold(text: str) -> list:
    """The gold answer parsed by math-verify; a bare LaTeX string like ``\\frac12`` is tried in $...$."""
    mv = _math_verify()
    for cand in (text, f"${text}$", f"\\boxed{{{text}}}"):
        gold = mv.parse(cand, parsing_timeout=None)
        if gold:
            return gold
    return []


def math_verify_score(completion: str, gold: str) -> float:
    """1.0 if math-verify finds ``completion``'s answer equivalent to ``gold``, else 0.0."""
    mv = _math_verify()
    parsed_gold = parse_gold(str(gold))
    if not parsed_gold:
        raise ValueError(f"math_verify: the gold answer {gold!r} could not be parsed")
    pred = mv.parse(completion, parsing_timeout=None)
    return float(bool(pred) and mv.verify(parsed_gold, pred, timeout_seconds=None))


@REWARDS.register("math_verify", needs_columns=("solution|answer",))
def math_verify_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 per completion whose answer math-verify finds equal to the row's ``solution`` / ``answer``."""
    n = len(completions)
    sol = column("solution", n, kwargs)
    ans = column("answer", n, kwargs)
    golds = [s if s is not None else a for s, a in zip(sol, ans)]
    missing = [i for i, g in enumerate(golds) if g is None]
    if missing:
        raise ValueError(f"math_verify: row(s) {missing[:5]} have neither a 'solution' nor an 'answer' column")
    return [math_verify_score(c, g) for c, g in zip(completions, golds)]


def make_format(pattern: str = DEFAULT_FORMAT, *, flags: int = re.DOTALL) -> Callable[..., list[float]]:
    """A ``format`` reward: 1.0 where ``re.fullmatch(pattern, completion)``; a bad regex is a ConfigError.

    A row's ``format_pattern`` column, if present, replaces ``pattern`` for that row.
    """
    try:
        compiled = re.compile(pattern, flags)
    except re.error as exc:
        raise ConfigError(f"format reward: pattern {pattern!r} is not a valid regular expression: {exc}") from None

    def format_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """1.0 per completion that matches the format pattern as a whole, else 0.0."""
        pats = column("format_pattern", len(completions), kwargs)
        return [float((compiled if p is None else re.compile(p, flags)).fullmatch(c) is not None)
                for c, p in zip(completions, pats)]

    return format_reward


REWARDS.register("format", factory=make_format, arg="<regex>")(make_format())

__all__ = ["DEFAULT_FORMAT", "make_format", "math_verify_reward", "math_verify_score", "parse_gold"]
