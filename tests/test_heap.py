"""tilt.heap: freed memory stays in the process, so a step's large tensors stop faulting fresh pages in.

Each check runs in a fresh interpreter: the glibc setting is process-wide and one-way, and the test
process's own allocator should stay as pytest found it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tilt.heap import _mallopt

# Allocate and fill the same two large tensors (48 MB, a 30M model's [positions, 2 x intermediate]
# activation, and 40 MB) ten times; report the page faults of the last five rounds. Both are above
# glibc's largest dynamic mmap threshold (32 MiB), so by default each is mapped afresh every round.
PROBE = r"""
import json, resource, sys, torch
from tilt.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
late = 0
for i in range(10):
    f = faults()
    x = torch.empty(4240, 2816).fill_(1.0)
    y = torch.empty(4240, 2400).fill_(2.0)
    assert float(x[-1, -1] + y[-1, -1]) == 3.0
    del x, y
    if i >= 5:
        late += faults() - f
print(json.dumps({"applied": applied, "late_faults": late}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_mallopt() is None, reason="glibc's mallopt only (Linux with glibc)")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = probe("default"), probe("keep")
    assert kept["applied"] is True and default["applied"] is False
    # glibc's default maps both blocks afresh every round: (11,660 + 9,940) pages fault in each time
    assert default["late_faults"] > 5 * 20000
    # kept: the heap has grown to the pattern by round 5 and serves it from memory already mapped
    assert kept["late_faults"] < default["late_faults"] / 10

def test_build_applies_it_unless_switched_off(monkeypatch, tmp_path):
    import tilt.trainer as trainer
    from tilt.config import Config

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(trainer, "resolve", lambda cfg: (_ for _ in ()).throw(RuntimeError("stop after the runtime setup")))
    for keep, expected in ((True, 1), (False, 0)):
        calls.clear()
        with pytest.raises(RuntimeError, match="stop after the runtime setup"):
            trainer.build(Config.model_validate({"keep_freed_memory": keep, "run_dir": str(tmp_path)}))
        assert len(calls) == expected
