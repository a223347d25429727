"""Reward scoring is defensive: errors, NaN, wrong lengths and hangs score 0 and are counted."""
from __future__ import annotations

import math
import time

import pytest

from tilt.rewards import resolve_reward_fn, score, verifier_reward

PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6"]
COLS = {"task": ["addition"] * 3, "columns": [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}]}


def test_verifier_reward_scores_with_the_task():
    assert verifier_reward(PROMPTS, COMPLETIONS, **COLS) == [1.0, 0.0, 1.0]


def test_weighted_sum_of_functions():
    def length(prompts, completions, **_):
        return [len(c) for c in completions]

    r, counts, msgs = score([verifier_reward, length], [1.0, 0.5], PROMPTS, COMPLETIONS, COLS, timeout=5)
    # verifier [1, 0, 1] + 0.5 * lengths [1, 1, 1] = [1.5, 0.5, 1.5]
    assert r == [1.5, 0.5, 1.5]
    assert counts["reward/errors"] == 0 and not msgs


def test_raising_function_scores_only_bad_samples_zero():
    def picky(prompts, completions, **_):
        if any(c == "5" for c in completions):
            raise RuntimeError("cannot score 5")
        return [1.0] * len(completions)

    r, counts, msgs = score([picky], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=5)
    assert r == [1.0, 0.0, 1.0]
    assert counts["reward/errors"] == 1
    assert "cannot score 5" in msgs[0]


def test_nan_reward_is_zero_and_counted():
    def nan_for_second(prompts, completions, **_):
        return [1.0, math.nan, math.inf][: len(completions)]

    r, counts, _ = score([nan_for_second], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=5)
    assert r == [1.0, 0.0, 0.0]
    assert counts["reward/nonfinite"] == 2


def test_wrong_length_is_an_error_not_a_crash():
    r, counts, msgs = score([lambda prompts, completions, **_: [1.0]], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=5)
    # the batch call returns 1 value for 3 completions -> retried one by one, each returning 1 value
    assert r == [1.0, 1.0, 1.0] and "returned 1 rewards for 3" in msgs[0]


def test_hanging_function_times_out():
    def hang(prompts, completions, **_):
        time.sleep(30)
        return [1.0] * len(completions)

    t = time.time()
    r, counts, msgs = score([hang], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=0.3)
    assert time.time() - t < 5
    assert r == [0.0, 0.0, 0.0] and counts["reward/timeouts"] == 3 and "timeout" in msgs[0]


def test_resolve_names_and_import_paths():
    assert resolve_reward_fn("verifier") is verifier_reward
    assert resolve_reward_fn("tilt.rewards:verifier_reward") is verifier_reward
    with pytest.raises(ValueError, match="valid names: .*verifier"):
        resolve_reward_fn("verifyer")
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward_fn("no_such_module_xyz:f")


def test_many_hanging_calls_do_not_exhaust_anything():
    """Eight hung calls in a row: each times out on its own; a good function still scores after them."""
    def hang(prompts, completions, **_):
        time.sleep(20)
        return [1.0] * len(completions)

    for _ in range(8):
        r, counts, _ = score([hang], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=0.05)
        assert counts["reward/timeouts"] == 3
    r, counts, _ = score([verifier_reward], [1.0], PROMPTS, COMPLETIONS, COLS, timeout=5)
    assert r == [1.0, 0.0, 1.0] and counts["reward/timeouts"] == 0
