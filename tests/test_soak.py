"""Kill-and-resume soak (issue 16, "what it must show" 1): SIGKILL a tiny CLI run at >= 20 points,
resume it, and require metrics.jsonl (timing keys excluded) and the final weights to equal an
uninterrupted run's, with every step logged once.

Kill points: >= 3 inside a checkpoint write (forced: ``TILT_TEST_SLOW_CKPT_S`` makes the write
sleep after its files are written, before the rename), >= 3 between the before-training evaluation
row and the first checkpoint, and the rest at random points of training: a random time (0 to 1.5
steps' wall time) after the row of a random step 0..5 appeared.
Slow (about 5-10 min on 2 cores): ``pytest -m slow tests/test_soak.py -s``. ``TILT_SOAK_TRIALS``
sets the number of random-point trials (default 17), ``TILT_SOAK_SEED`` their seed (default 0).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tilt.tracking import TIMING_KEYS

pytestmark = pytest.mark.slow

ARGS = ["--set", "train.steps=6", "--set", "checkpoint.every=2", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.group_size=2", "--set", "tasks.eval_per_cell=1", "--set", "threads=1",
        "--set", "tasks.mix=addition:1,sorting:1", "--set", "log.tensorboard=false", "--set", "eval.every=3",
        "--set", "optim.lr=0.003", "--set", "train.minibatches=1", "--set", "log.plot=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(args, env_extra=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tilt.cli", "train", *args], env={**ENV, **(env_extra or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _logged(run: Path) -> list[int]:
    """Steps with a complete row in metrics.jsonl so far."""
    p = run / "metrics.jsonl"
    lines = p.read_text().splitlines() if p.exists() else []
    return [json.loads(ln)["step"] for ln in lines if ln.endswith("}")]


def _step0_logged(run: Path) -> bool:
    p = run / "metrics.jsonl"
    return p.exists() and p.read_text().startswith('{"step": 0')


def _ckpt_writing(run: Path) -> bool:
    return any((run / "checkpoints").glob(".tmp_step_*"))


def _kill_when(proc: subprocess.Popen, cond, timeout=300.0) -> bool:
    """SIGKILL ``proc`` once ``cond()`` holds; False if it finished first."""
    t = time.time()
    while not cond():
        if proc.poll() is not None:
            return False
        assert time.time() - t < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def test_kill_and_resume_soak(tmp_path, tiny_llama_dir):
    base = [*ARGS, "--set", f"model.path={tiny_llama_dir}"]
    ref = tmp_path / "ref"
    p = _start([*base, "--run-dir", str(ref)])
    while not (ref / "config.yaml").exists():
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    t0 = time.time()  # the run's state starts with config.yaml; random kills fall after it
    assert p.wait(timeout=600) == 0, p.stderr.read()
    t_ref = time.time() - t0
    ref_rows, ref_w = _rows(ref), load_file(str(ref / "final" / "model.safetensors"))
    assert [r["step"] for r in ref_rows] == [0, 1, 2, 3, 4, 5, 6]

    rng = random.Random(int(os.environ.get("TILT_SOAK_SEED", "0")))
    n_random = int(os.environ.get("TILT_SOAK_TRIALS", "17"))
    trials = [("in checkpoint write", None)] * 3 + [("after eval, before 1st checkpoint", None)] * 3
    # random points spread over training: after the row of a random step s appears, a random fraction
    # of one step's wall time (from the reference run; a fraction > 1 reaches into the next step)
    raw = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r.get("time/step_s", 0.0) for r in raw) / 6
    trials += [("random point", (rng.randrange(0, 6), rng.uniform(0.0, 1.5) * step_s)) for _ in range(n_random)]
    report = []
    for i, (kind, delay) in enumerate(trials):
        run = tmp_path / f"t{i:02d}"
        extra = {"TILT_TEST_SLOW_CKPT_S": "2"} if kind == "in checkpoint write" else {}
        proc = _start([*base, "--run-dir", str(run)], extra)
        if kind == "in checkpoint write":
            killed = _kill_when(proc, lambda: _ckpt_writing(run))
        elif kind.startswith("after eval"):
            killed = _kill_when(proc, lambda: _step0_logged(run))
            assert not any((run / "checkpoints").glob("step_*")), "killed after the first checkpoint"
        else:
            step, after = delay
            state: dict = {}

            def due() -> bool:  # `after` seconds after the row of `step` appeared
                if "t" not in state and step in _logged(run):
                    state["t"] = time.time()
                return "t" in state and time.time() - state["t"] >= after

            killed = _kill_when(proc, due)
        ckpts = sorted(p.name for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else []
        logged = _logged(run)
        if killed:
            r = subprocess.run([sys.executable, "-m", "tilt.cli", "train", "--resume", str(run)], env=ENV,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"trial {i} ({kind}): resume failed\n{r.stderr}"
        rows = _rows(run)
        w = load_file(str(run / "final" / "model.safetensors"))
        steps = [row["step"] for row in rows]
        assert len(steps) == len(set(steps)), f"trial {i} ({kind}): duplicate step in {steps}"
        assert rows == ref_rows, f"trial {i} ({kind}): metrics differ from the uninterrupted run"
        assert w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w), f"trial {i}: weights"
        report.append((i, kind, delay, killed, logged, ckpts))
    for i, kind, delay, killed, logged, ckpts in report:
        when = f"{delay[1]:4.2f}s after row {delay[0]}" if delay is not None else ""
        print(f"trial {i:2d} {kind:34s} {when:18s} killed={killed} rows-at-kill={logged} checkpoints-at-kill={ckpts}")
    n_killed = sum(k for *_, k, _, _ in report)
    print(f"reference run {t_ref:.1f} s; {n_killed} of {len(report)} trials killed and resumed; all identical")
    assert n_killed >= 20
    assert sum(k for _, kind, _, k, _, _ in report if kind == "in checkpoint write") >= 3
    assert sum(k for _, kind, _, k, _, _ in report if kind.startswith("after eval")) >= 3
