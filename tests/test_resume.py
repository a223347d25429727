"""A run killed with SIGKILL (also mid-checkpoint-write) resumes and matches an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tilt.tracking import TIMING_KEYS

ARGS = ["--set", "train.steps=6", "--set", "checkpoint.every=2", "--set", "rollout.prompts_per_step=4",
        "--set", "rollout.group_size=4", "--set", "tasks.eval_per_cell=2", "--set", "threads=1",
        "--set", "tasks.mix=addition:1,sorting:1", "--set", "log.tensorboard=false", "--set", "eval.every=3",
        "--set", "optim.lr=0.003"]

# Runs the CLI in a child; when TILT_TEST_SLOW_CKPT is set, every checkpoint weight file write
# sleeps afterwards, so the parent can SIGKILL it while a checkpoint is half-written.
CHILD = r"""
import os, sys, time
if os.environ.get("TILT_TEST_SLOW_CKPT"):
    import tilt.checkpoint as c
    real = c.save_file
    def slow(*a, **k):
        real(*a, **k)
        time.sleep(float(os.environ["TILT_TEST_SLOW_CKPT"]))
    c.save_file = slow
from tilt.cli import app
sys.exit(app(sys.argv[1:]))
"""


def _cli(args, env_extra=None, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    return proc


def _rows(run: Path):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _wait_for(cond, timeout=200):
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            raise TimeoutError
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama_dir):
    run = tmp_path_factory.mktemp("ref") / "run"
    _cli(ARGS + ["--set", f"model.path={tiny_llama_dir}", "--run-dir", str(run)])
    return run


def _kill_and_resume(run: Path, tiny_llama_dir: Path, cond, env_extra=None):
    proc = _cli(ARGS + ["--set", f"model.path={tiny_llama_dir}", "--run-dir", str(run)], env_extra, wait=False)
    try:
        _wait_for(lambda: cond(run) or proc.poll() is not None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child must have been killed, not finished"
    assert not (run / "summary.json").exists()
    _cli(["--resume", str(run)])


def test_sigkill_mid_run_resumes_to_identical_metrics(tmp_path, reference_run, tiny_llama_dir):
    run = tmp_path / "run"

    def after_step_3(r):  # checkpoint of step 2 exists and step 3 was logged
        p = r / "metrics.jsonl"
        return p.exists() and any(json.loads(ln)["step"] == 3 for ln in p.read_text().splitlines() if ln)

    _kill_and_resume(run, tiny_llama_dir, after_step_3)
    assert _rows(run) == _rows(reference_run)
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4, 5, 6]


def test_sigkill_during_checkpoint_write_resumes_to_identical_metrics(tmp_path, reference_run, tiny_llama_dir):
    """Killed while checkpoint step 4 is half-written: the temp dir is ignored, step 2 is used."""
    run = tmp_path / "run"

    def writing_step_4(r):
        return any((r / "checkpoints").glob(".tmp_step_0000004_*"))

    _kill_and_resume(run, tiny_llama_dir, writing_step_4, {"TILT_TEST_SLOW_CKPT": "3"})
    assert _rows(run) == _rows(reference_run)
    summary = json.loads((run / "summary.json").read_text())
    ref = json.loads((reference_run / "summary.json").read_text())
    assert summary["heldout"] == ref["heldout"]


def test_resume_of_finished_or_missing_run_is_clear(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tilt.cli", "train", "--resume", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
