"""Reward calls in worker processes (issue 16 cases 6, 7, 8): killed on timeout, crashes contained,
the trainer's process untouched, results strict."""
from __future__ import annotations

import functools
import json
import os
import threading
import time
import warnings

import pytest
import reward_fixtures as rf

from tilt import reward_pool
from tilt.config import load_config
from tilt.reward_pool import as_reals
from tilt.rewards import score, verifier_reward
from tilt.trainer import train

PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6"]
COLS = {"task": ["addition"] * 3, "columns": [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}]}


def _score(fn, timeout=20.0):
    return score([fn], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=timeout)


@pytest.mark.parametrize("fn,why", [(rf.exits, "exited with code 3"), (rf.segfaults, "killed by signal SIGSEGV")])
def test_crash_scores_the_batch_zero_is_counted_and_the_worker_is_replaced(fn, why):
    r, counts, msgs = _score(fn)
    assert r == [0.0, 0.0, 0.0] and counts["reward/crashes"] == 3 and counts["reward/errors"] == 0
    assert len(msgs) == 1 and why in msgs[0] and "its 3 samples score 0" in msgs[0]
    r, counts, _ = _score(verifier_reward)  # the pool goes on with a fresh worker
    assert r == [1.0, 0.0, 1.0] and counts["reward/crashes"] == 0


def test_reward_cannot_change_the_trainers_cwd_or_environment():
    cwd = os.getcwd()
    r, counts, _ = _score(rf.changes_cwd_and_env)
    assert r == [1.0, 1.0, 1.0]
    assert os.getcwd() == cwd and "TILT_TEST_LEAK" not in os.environ


@pytest.mark.parametrize("fn,named", [
    (rf.returns_dict, "returned dict, not a sequence of real numbers"),
    (rf.returns_strings, "element 0 is str ('1'), not a real number"),
    (rf.returns_bools, "element 0 is bool (True), not a real number"),
    (rf.returns_nested, "element 0 is list ([1.0]), not a real number")])
def test_results_that_are_not_real_numbers_are_errors_per_sample_naming_the_type(fn, named):
    """Case 7: a dict was read as its keys (rewards 0..2, no error); strings were coerced."""
    r, counts, msgs = _score(fn)
    assert r == [0.0, 0.0, 0.0] and counts["reward/errors"] == 3
    assert len(msgs) == 1 and named in msgs[0]


def test_numpy_arrays_are_real_numbers_and_none_is_no_reward():
    r, counts, _ = _score(rf.returns_numpy)
    assert r == [0.0, 1.0, 2.0] and counts["reward/errors"] == 0  # np.arange(3)
    r, counts, _ = _score(rf.returns_none_first)
    assert r == [0.0, 1.0, 1.0] and counts["reward/nonfinite"] == 1  # None -> NaN -> 0, counted


def test_as_reals_accepts_ints_and_floats_only():
    assert as_reals((1, 2.5)) == ([1.0, 2.5], "")
    assert as_reals("12")[1] == "returned str, not a sequence of real numbers (list[float])"


def test_unpicklable_closure_runs_in_process_with_a_warning():
    lock = threading.Lock()

    def needs_lock(prompts, completions, **_):
        with lock:
            return [1.0] * len(completions)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r, counts, _ = _score(needs_lock)
    assert r == [1.0, 1.0, 1.0]
    assert any("runs in the trainer process" in str(w.message) and "needs_lock" in str(w.message) for w in caught)


def test_closures_that_pickle_run_isolated():
    def exits_in_closure(prompts, completions, **_):
        raise SystemExit(4)  # would end the trainer if run in its process

    r, counts, msgs = _score(exits_in_closure)
    assert r == [0.0, 0.0, 0.0] and counts["reward/crashes"] == 3 and "exited with code 4" in msgs[0]


def _cfg(model_dir, run_dir, *extra):
    return load_config(None, [f"model.path={model_dir}", f"run_dir={run_dir}", "train.steps=2",
                              "rollout.prompts_per_step=2", "rollout.group_size=2", "tasks.eval_per_cell=1",
                              "tasks.mix=addition:1", "log.tensorboard=false", "log.plot=false", "threads=1",
                              "log.progress=none", "train.minibatches=1", "eval.every=0", *extra])


def test_bad_result_message_once_per_run_and_errors_counted_per_sample(tiny_llama_dir, tmp_path):
    msgs: list[str] = []
    train(_cfg(tiny_llama_dir, tmp_path / "r"), reward_fns=[rf.returns_dict], echo=msgs.append)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/errors" in r]
    assert [r["reward/errors"] for r in steps] == [4.0, 4.0]  # B*G = 2*2 samples per step, 2 steps
    assert [r["reward/mean"] for r in steps] == [0.0, 0.0]
    assert sum("returned dict" in m for m in msgs) == 1, msgs


def test_reward_spinning_60s_holding_the_gil_costs_about_the_timeout_per_call(tiny_llama_dir, tmp_path):
    """Case 6 / "must show" 3: with a 2 s timeout each of the 2 steps' calls costs ~2 s plus a worker
    restart (~0.1-0.2 s, overlapped). Old code: the abandoned thread kept the GIL, 60 s per call."""
    train(_cfg(tiny_llama_dir, tmp_path / "warm", "reward.timeout_s=2"), reward_fns=[rf.constant],
          echo=lambda s: None)  # one-off costs (first worker, first model load) out of the comparison
    t = time.time()
    train(_cfg(tiny_llama_dir, tmp_path / "base", "reward.timeout_s=2"), reward_fns=[rf.constant],
          echo=lambda s: None)
    base = time.time() - t
    piddir = tmp_path / "pids"
    piddir.mkdir()
    restarts = reward_pool.default_pool().restarts
    t = time.time()
    train(_cfg(tiny_llama_dir, tmp_path / "spin", "reward.timeout_s=2"),
          reward_fns=[functools.partial(rf.spin_holding_gil, piddir=str(piddir))], echo=lambda s: None)
    spin = time.time() - t
    rows = [json.loads(ln) for ln in (tmp_path / "spin" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/timeouts"] for r in rows if "reward/timeouts" in r] == [4.0, 4.0]
    # timed-out calls: the 2 training steps' and the held-out evaluations' (which score with the
    # run's reward): one killed worker each
    calls = reward_pool.default_pool().restarts - restarts
    extra = spin - base
    print(f"baseline run {base:.1f} s, spinning-reward run {spin:.1f} s, extra {extra:.1f} s for {calls} "
          "timed-out calls")
    assert calls >= 2
    assert calls * 2.0 <= extra + 1.0, "each call waits its timeout"
    assert extra <= calls * 2.0 + 4.0, f"extra {extra:.1f} s: more than 2 s per call plus restarts and noise"
    pids = [int(p.stem) for p in piddir.glob("*.pid")]
    assert len(pids) == calls  # one worker per timed-out call, each killed
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert reward_pool.default_pool().restarts >= 2


def test_in_process_opt_out_runs_in_the_trainers_process():
    def pid(prompts, completions, **_):
        return [float(os.getpid())] * len(completions)

    r, _, _ = _score(pid)
    assert r[0] != float(os.getpid())  # a worker process by default
    pid.tilt_in_process = True
    r, _, _ = _score(pid)
    assert r == [float(os.getpid())] * 3


def test_log_metric_called_in_the_worker_reaches_the_trainers_state():
    """TRL's log_metric runs in the worker process on a copy of the trainer state; what it logged
    comes back with the result: lengths 2 and 4, then 6 -> mean (2 + 4 + 6) / 3 = 4."""
    from tilt.rewards import RewardState

    state = RewardState()
    score([rf.logs_lengths], [1.0], ["p", "p"], ["ab", "abcd"], {}, timeout=30, trainer_state=state)
    score([rf.logs_lengths], [1.0], ["p"], ["abcdef"], {}, timeout=30, trainer_state=state)
    assert state.pop_logged() == {"reward_fn/length": 4.0}
    assert state.pop_logged() == {}  # popped once per step
