"""Freed memory stays in the process for the next step's tensors (glibc's malloc, Linux).

Each RL step allocates the same large tensors again: activations of [positions, intermediate] floats,
logits, gradients. glibc serves every block above its mmap threshold (128 KiB to 32 MiB) with a fresh
``mmap`` and returns it to the kernel on free, so the next step's tensor of the same size faults every
4 KiB page in again and the kernel zeroes it. On a virtual machine a fault is expensive: allocating and
filling a 48 MB tensor took 20 ms fresh against 1 ms in reused memory (2-core AMD EPYC VM, issue 14), and
a 30M-parameter learner update spent about 11 % of its time there (benchmarks/README.md, speed work 24).

``keep_freed_memory`` sets two glibc parameters (``mallopt(3)``): no ``mmap`` for large blocks
(``M_MMAP_MAX = 0``), so they come from the heap, and no trimming of the heap's free top
(``M_TRIM_THRESHOLD`` at its maximum), so freed blocks stay mapped and the next allocation reuses them.
The process's resident memory then stays at its high-water mark instead of falling between steps; the
peak itself is what it was. The RL trainer (``tilt.trainer.build``) calls it when the config's
``keep_freed_memory`` is set (the default); ``tilt sft`` and the base model's pretraining do not. Without
glibc it does nothing and says so by returning False.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
# The same setting as glibc's environment variables, for a process started with it (benchmarks/step_time.py
# gives it to a TRL worker, so both sides of a comparison can run with it).
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX)}

_state: dict[str, bool] = {}


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a stub
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones mapped (once per process). True when applied."""
    if "kept" not in _state:
        fn = _mallopt()
        _state["kept"] = fn is not None and fn(M_MMAP_MAX, 0) == 1 and fn(M_TRIM_THRESHOLD, _INT_MAX) == 1
    return _state["kept"]
