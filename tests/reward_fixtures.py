"""Reward functions for tests, importable by a reward worker process (no torch import here)."""
from __future__ import annotations

import ctypes
import os
import sys
import time


def constant(prompts, completions, **_):
    return [0.5] * len(completions)


def spin_holding_gil(prompts, completions, *, piddir=None, **_):
    """Spins 60 s in C-level loops that never release the GIL (a thread could not be stopped);
    leaves ``piddir/<pid>.pid`` so a test can check the process was killed."""
    if piddir:
        open(os.path.join(piddir, f"{os.getpid()}.pid"), "w").close()
    end = time.time() + 60
    while time.time() < end:
        sum(range(10**6))
    return [1.0] * len(completions)


def exits(prompts, completions, **_):
    sys.exit(3)


def segfaults(prompts, completions, **_):
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def changes_cwd_and_env(prompts, completions, **_):
    os.chdir("/")
    os.environ["TILT_TEST_LEAK"] = "1"
    return [1.0] * len(completions)


def returns_dict(prompts, completions, **_):
    return {i: 1.0 for i in range(len(completions))}


def returns_strings(prompts, completions, **_):
    return ["1"] * len(completions)


def returns_bools(prompts, completions, **_):
    return [True] * len(completions)


def returns_nested(prompts, completions, **_):
    return [[1.0] for _ in completions]


def returns_numpy(prompts, completions, **_):
    import numpy as np

    return np.arange(len(completions), dtype=np.float32)


def returns_none_first(prompts, completions, **_):
    return [None] + [1.0] * (len(completions) - 1)


def logs_lengths(prompts, completions, log_metric=None, **_):
    """Logs each completion's length through TRL's ``log_metric`` and returns it as the reward."""
    for c in completions:
        log_metric("length", float(len(c)))
    return [float(len(c)) for c in completions]
