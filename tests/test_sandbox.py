"""code_exec's sandbox: hostile model-written code fails or is stopped, scores 0, and changes nothing.

Each hostile program below is scored by the ``code_exec`` reward through ``tilt.rewards.score``
(the trainer's path) in one batch with an honest program, which must still score 1.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tilt.config import ConfigError
from tilt.rewards import resolve_reward_fn, score
from tilt.verifiers.code_exec import extract_code, make_code_exec
from tilt.verifiers.sandbox import check_sandbox, run_python

try:
    check_sandbox()
    WHY_NOT = ""
except RuntimeError as exc:  # the sandbox needs root + namespaces; say so instead of passing silently
    WHY_NOT = str(exc)
needs_sandbox = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)

LIMITS = {"wall_s": 4.0, "cpu_s": 1, "memory_mb": 256, "max_procs": 8}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_sandbox
def test_honest_program_passes_assert_and_stdio_tests():
    fn = resolve_reward_fn("code_exec")
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    half = "def add(a, b):\n    return a * b"  # 1*2 != 3 fails; 2*2 == 2+2 passes
    r = fn(["p", "p"], [good, half], tests=[["assert add(1, 2) == 3", "assert add(2, 2) == 4"]] * 2)
    assert r == [1.0, 0.5]
    echo = "print(sum(map(int, input().split())))"
    r = fn(["p"], [echo], columns=[{"tests": {"inputs": ["1 2", "3 4", "5 5"], "outputs": ["3", "7", "11"]}}])
    assert r == pytest.approx([2 / 3])  # 1+2=3 yes, 3+4=7 yes, 5+5=10 != 11


@needs_sandbox
def test_hostile_programs_score_zero_and_change_nothing(tmp_path, monkeypatch):
    guard = tmp_path / "guarded"
    guard.mkdir()
    (guard / "keep.txt").write_text("original")
    before = _tree(guard)
    monkeypatch.setenv("TILT_TEST_SECRET", "s3cret-value")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    me = os.getpid()
    outside = f"/tmp/tilt-sandbox-escape-{me}"
    hostile = {
        "socket": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('ok')",
        "write_outside": f"open({str(guard / 'keep.txt')!r}, 'w').write('pwned')\n"
                         f"open({str(guard / 'new.txt')!r}, 'w').write('pwned')\nprint('ok')",
        "write_tmp": f"open({outside!r}, 'w').write('pwned')\nprint('ok')",
        "parent_env": "import os, glob\nfound = 's3cret' in str(os.environ)\n"
                      "for p in glob.glob('/proc/*/environ'):\n"
                      "    try:\n        found |= b's3cret' in open(p, 'rb').read()\n"
                      "    except OSError:\n        pass\nprint('ok' if found else 'no')",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "alloc_10gb": "x = bytearray(10 * 1024 ** 3)\nprint('ok')",
        "loop_forever": "while True:\n    pass",
        "sleep_forever": "import time\ntime.sleep(3600)",
        "kill_parent": f"import os, signal\nfor pid in ({me}, os.getppid()):\n    try:\n"
                       f"        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                       f"os.kill(-1, signal.SIGKILL)\nprint('ok')",
    }
    honest = "print('ok')"
    fn = make_code_exec(limits=LIMITS)
    names = list(hostile) + ["honest"]
    completions = list(hostile.values()) + [honest]
    # Every program must print "ok" to pass; a hostile one only prints it if its attack worked.
    tests = [[{"input": "", "output": "ok"}]] * len(names)
    t0 = time.time()
    r, counts, msgs = score([fn], [1.0], ["p"] * len(names), completions, {"tests": tests}, timeout=120)
    elapsed = time.time() - t0
    assert dict(zip(names, r)) == {**{k: 0.0 for k in hostile}, "honest": 1.0}
    assert counts == {"reward/errors": 0.0, "reward/nonfinite": 0.0, "reward/timeouts": 0.0,
                      "reward/crashes": 0.0} and not msgs
    # 9 sandboxes, each stopped by its 4 s wall clock at the latest, two at a time on 2 CPUs
    assert elapsed < 9 * LIMITS["wall_s"] + 10
    assert _tree(guard) == before and not Path(outside).exists()
    with pytest.raises(BlockingIOError):  # nobody ever connected to our listening socket
        server.accept()
    server.close()
    assert os.environ["TILT_TEST_SECRET"] == "s3cret-value"  # and we are still alive to check


@needs_sandbox
def test_each_limit_stops_its_attack():
    # fork: children that each sleep; pids.max = 8 bounds the namespace to 8 processes, so at
    # most 7 forks succeed (the program itself is the 8th).
    forks = ("import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n"
             "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
             "print(n, flush=True)\nos._exit(0)")
    res = run_python(forks, limits=LIMITS)
    assert res.status == "ok" and 0 < int(res.stdout) <= LIMITS["max_procs"] - 1
    res = run_python("x = bytearray(10 * 1024 ** 3)", limits=LIMITS)
    assert res.status == "error" and "MemoryError" in res.stderr
    t0 = time.time()
    res = run_python("while True:\n    pass", limits={**LIMITS, "wall_s": 30.0})
    # RLIMIT_CPU soft 1 s sends SIGXCPU (24): exit status 128 + 24 = 152, long before the 30 s wall
    assert res.status == "killed" and res.returncode == 152 and time.time() - t0 < 10
    t0 = time.time()
    res = run_python("import time\ntime.sleep(3600)", limits={**LIMITS, "wall_s": 1.0})
    assert res.status == "timeout" and time.time() - t0 < 5
    res = run_python("open('big', 'w').write('x' * (32 << 20))", limits={**LIMITS, "max_file_mb": 1})
    assert res.status == "error" and "File too large" in res.stderr
    import tempfile

    from tilt.verifiers.sandbox import scratch_root

    sibling = Path(tempfile.mkdtemp(prefix="tilt-sandbox-sibling-", dir=scratch_root()))  # another sample's scratch
    res = run_python("import os\nprint(os.listdir(os.path.dirname(os.getcwd())) == [os.path.basename(os.getcwd())])")
    sibling.rmdir()
    assert res.stdout == "True\n"  # scratch's parent (the sandboxes' root) shows only scratch itself
    res = run_python("import os\nprint(sorted(n for n in os.listdir('/dev') if not os.path.islink('/dev/' + n)))")
    assert res.stdout.split("\n")[0] == str(["full", "null", "random", "urandom", "zero"])  # no disks, no tty
    res = run_python("import os\nprint(sorted(os.environ))\nopen('mine.txt', 'w').write('scratch is writable')\n"
                     "print(open('mine.txt').read())")
    assert res.stdout.splitlines() == [str(["HOME", "LANG", "PATH", "TMPDIR"]), "scratch is writable"]
    # filling the disk: scratch is an 8 MiB tmpfs, so the 9th 1 MiB file fails and nothing reaches the disk
    res = run_python("for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    print(i, flush=True)",
                     limits={**LIMITS, "scratch_mb": 8})
    assert res.status == "error" and "No space left on device" in res.stderr
    assert 0 < len(res.stdout.split()) <= 8  # fewer than 8 whole files fit beside tmpfs overhead


def test_row_without_tests_is_a_clear_error():
    fn = make_code_exec()
    with pytest.raises(ValueError, match="row\\(s\\) \\[1\\] have no 'tests' column"):
        fn(["p", "p"], ["print(1)", "print(2)"], tests=[["assert True"], None])
    with pytest.raises(ValueError, match="non-empty 'tests'"):
        fn(["p"], ["print(1)"], tests=[[]])


@pytest.mark.parametrize("limits, field", [({"cpu_s": "2"}, "cpu_s"), ({"memory_mb": 1.5}, "memory_mb"),
                                           ({"wall_s": "5s"}, "wall_s"), ({"cpus": 2}, "cpus")])
def test_sandbox_limit_of_the_wrong_type_is_a_config_error(limits, field):
    with pytest.raises(ConfigError, match=f"sandbox limit {field}=.*Allowed limits: wall_s"):
        make_code_exec(limits=limits)


def test_extract_code_takes_the_last_fenced_block():
    assert extract_code("x\n```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("print(1)") == "print(1)"


@needs_sandbox
def test_code_mul_task_runs_its_completion_in_the_sandbox():
    from tilt.tasks import get_task
    from tilt.tasks.arithmetic import MULTIPLICATION

    task = get_task("code_mul")
    assert task.difficulties == MULTIPLICATION.difficulties
    item = task.generate(5, 2)  # the multiplication item of seed 5: "90*6=" -> 540
    assert (item.prompt, item.answer) == (MULTIPLICATION.generate(5, 2).prompt, "540") == ("90*6=", "540")
    # program "print(" + completion + ")": "540" and "90*6" both print 540; "54" prints 54
    assert [task.verify(c, **item.columns) for c in ("540", "90*6", "54", "__import__('os')._exit(0)")] == \
        [1.0, 1.0, 0.0, 0.0]


@needs_sandbox
def test_sandboxes_of_a_killed_caller_are_swept():
    import subprocess
    import sys
    import tempfile

    from tilt.verifiers.sandbox import _pids_cgroup_root, scratch_root

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID now names no live process
    cg = _pids_cgroup_root() / f"tilt-sandbox-{dead.pid}-orphan"
    cg.mkdir()
    scratch = Path(tempfile.mkdtemp(prefix=f"tilt-sandbox-{dead.pid}-", dir=scratch_root()))
    (scratch / "program.py").write_text("print(1)")
    mine = Path(tempfile.mkdtemp(prefix=f"tilt-sandbox-{os.getpid()}-", dir=scratch_root()))  # a live caller's: kept
    assert run_python("print(1)").stdout == "1\n"
    assert not cg.exists() and not scratch.exists() and mine.exists()
    mine.rmdir()
