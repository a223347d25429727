"""``code_exec`` reward: model-written Python run against a row's tests in the sandbox.

Reward = fraction of the row's tests passed, each test in its own fresh sandbox
(``tilt.verifiers.sandbox``), so a crash, hang, fork bomb or memory blow-up in one sample
scores 0 for that test and cannot touch the caller or any other sample.

A row's ``tests`` column is one of
- a list of assert statements (MBPP / HumanEval style), e.g. ``["assert add(1, 2) == 3"]``:
  the test passes if the program followed by the statement exits with status 0 and prints
  a random per-run marker placed after it;
- a list of ``{"input": str, "output": str}`` (APPS / CodeContests style): passes if stdout,
  trailing whitespace of each line and of the whole ignored, equals ``output``;
- ``{"inputs": [...], "outputs": [...]}`` (the same, column-wise).

The program is the last fenced code block of the completion (```python ...```), or the whole
completion when it has none; a row's optional ``code_prefix`` / ``code_suffix`` (e.g. ``"print("``
and ``")"``) are put around it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from tilt.config import ConfigError
from tilt.rewards import REWARDS
from tilt.verifiers.columns import column
from tilt.verifiers.sandbox import SandboxLimits, check_sandbox, make_limits, run_python

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced code block of ``completion``, or the whole text when there is none."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def normalise_tests(tests: Any, *, row: int = 0) -> list[Any]:
    """A row's tests as a list of assert strings and {"input", "output"} dicts; ValueError otherwise."""
    if isinstance(tests, dict) and set(tests) >= {"inputs", "outputs"}:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError(f"code_exec: row {row} has {len(tests['inputs'])} test inputs but "
                             f"{len(tests['outputs'])} outputs")
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError(f"code_exec: row {row} needs a non-empty 'tests' column (a list of assert "
                         f"statements or of {{'input', 'output'}} pairs), got {tests!r}")
    for t in tests:
        ok = isinstance(t, str) or (isinstance(t, dict) and set(t) >= {"input", "output"})
        if not ok:
            raise ValueError(f"code_exec: row {row} has a test that is neither an assert statement "
                             f"nor an {{'input', 'output'}} pair: {t!r}")
    return list(tests)


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in str(text).rstrip().splitlines()]


def run_test(program: str, test: Any, limits: SandboxLimits) -> bool:
    """True when ``program`` passes one test inside a fresh sandbox."""
    if isinstance(test, str):
        marker = f"tilt-pass-{secrets.token_hex(8)}"
        res = run_python(f"{program}\n\n{test}\nprint({marker!r})\n", limits=limits)
        return res.status == "ok" and _lines(res.stdout)[-1:] == [marker]
    res = run_python(program, stdin=str(test["input"]), limits=limits)
    return res.status == "ok" and _lines(res.stdout) == _lines(test["output"])


def make_code_exec(*, limits: Optional[dict | SandboxLimits] = None,
                   workers: Optional[int] = None) -> Callable[..., list[float]]:
    """A ``code_exec`` reward with these sandbox limits (ConfigError on a wrong key or type).

    A row's ``sandbox_limits`` column, if present, overrides ``limits`` for that row.
    ``workers`` sandboxes run at once (default: the number of CPUs).
    """
    base = make_limits(limits)
    n_workers = workers or os.cpu_count() or 1

    def code_exec(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """Fraction of each row's tests that its completion's program passes."""
        check_sandbox()
        n = len(completions)
        tests = [normalise_tests(t, row=i) for i, t in
                 enumerate(column("tests", n, kwargs, required=True, who="code_exec"))]
        prefixes, suffixes = column("code_prefix", n, kwargs), column("code_suffix", n, kwargs)
        lims = [base if o is None else make_limits({**base.model_dump(), **o})
                for o in column("sandbox_limits", n, kwargs)]
        programs = [(p or "") + extract_code(c) + (s or "") for p, c, s in zip(prefixes, completions, suffixes)]
        jobs = [(i, programs[i], t, lims[i]) for i in range(n) for t in tests[i]]
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            passed = list(pool.map(lambda j: run_test(j[1], j[2], j[3]), jobs))
        out = [0.0] * n
        for (i, *_), ok in zip(jobs, passed):
            out[i] += float(ok) / len(tests[i])
        return out

    return code_exec


def code_exec_from_json(text: str) -> Callable[..., list[float]]:
    """``code_exec={"cpu_s": 2, "wall_s": 3.0}``: a code_exec reward with these sandbox limits."""
    try:
        limits = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"code_exec limits {text!r} are not a JSON object: {exc}") from None
    return make_code_exec(limits=limits)


REWARDS.register("code_exec", needs_columns=("tests",), factory=code_exec_from_json,
                 arg='{"cpu_s": 2, "wall_s": 5.0, "memory_mb": 512, "max_procs": 16}')(make_code_exec())

__all__ = ["extract_code", "make_code_exec", "normalise_tests", "run_test"]
