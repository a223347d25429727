"""One trainer per run directory (issue 16 case 2): two real processes, the lock, and SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tilt.config import ConfigError
from tilt.run_lock import RunDirLocked, RunLock

ARGS = ["--set", "train.steps=4", "--set", "checkpoint.every=2", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.group_size=2", "--set", "tasks.eval_per_cell=1", "--set", "threads=1",
        "--set", "tasks.mix=addition:1", "--set", "log.tensorboard=false", "--set", "log.plot=false",
        "--set", "eval.every=0", "--set", "train.minibatches=1"]
# every checkpoint write sleeps this long inside the write, so the holder stays alive for a while
SLOW = {"TILT_TEST_SLOW_CKPT_S": "4"}


def _start(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "tilt.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        # a second open file description in this very process is refused like another process
        with pytest.raises(RunDirLocked, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path)
        assert issubclass(RunDirLocked, ConfigError)  # the CLI prints it as `error: ...`, exit 2
    RunLock(tmp_path).release()  # released on exit of the with-block: taking it again works


def test_two_trainers_at_once_exactly_one_runs_the_other_names_its_pid(tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    args = [*ARGS, "--set", f"model.path={tiny_llama_dir}", "--run-dir", str(run)]
    a, b = _start(*args, env_extra=SLOW), _start(*args, env_extra=SLOW)
    while a.poll() is None and b.poll() is None:
        time.sleep(0.05)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    _, err = loser.communicate()
    assert loser.returncode == 2, err
    assert f"is in use by process {winner.pid}" in err and "Traceback" not in err
    assert winner.poll() is None, "the refused trainer must exit while the holder is still running"
    # a --resume while the holder lives is refused too
    r = subprocess.run([sys.executable, "-m", "tilt.cli", "train", "--resume", str(run)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"is in use by process {winner.pid}" in r.stderr, r.stderr
    assert winner.poll() is None
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4], "one run's rows only, no interleaving"


def test_sigkilled_holder_does_not_block_resume(tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    a = _start(*ARGS, "--set", f"model.path={tiny_llama_dir}", "--run-dir", str(run), env_extra=SLOW)
    t0 = time.time()
    while not any((run / "checkpoints").glob(".tmp_step_*")):  # inside the first checkpoint write
        assert a.poll() is None and time.time() - t0 < 200
        time.sleep(0.05)
    assert (run / ".lock").read_text().strip() == str(a.pid)
    a.send_signal(signal.SIGKILL)
    a.wait()
    r = subprocess.run([sys.executable, "-m", "tilt.cli", "train", "--resume", str(run)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert (run / "summary.json").exists()
