"""The step-wise addition task with verifiable process rewards (for catalogue C4, PURE)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilt.advantages import ADVANTAGES
from tilt.batch import AdvantageInput
from tilt.tasks.addition_steps import ADDITION_STEPS as TASK
from tilt.tasks.base import SEED_RANGES
from tilt.tokenizer import ALPHABET

seeds = st.integers(*SEED_RANGES["train"]).map(lambda s: min(s, SEED_RANGES["train"][1] - 1))
difficulties = st.sampled_from(TASK.difficulties)


def test_hand_example_format_and_rewards():
    # 47 + 85: 7+5 = 12 -> "2c1"; 4+8+1 = 13 -> "3c1"; sum 132
    c = "2c1,3c1>132"
    assert TASK.verify(c, a=47, b=85) == 1.0
    assert TASK.step_rewards(c, a=47, b=85) == [1.0, 1.0, 1.0]
    assert TASK.step_char_ends(c, a=47, b=85) == [2, 6, 10]
    # wrong carry in step 0 ("2c0"): step 0 wrong; step 1 judged with the written carry 0:
    # 4 + 8 + 0 = 12 -> "2c1" expected, "3c1" wrong; the answer is still right
    assert TASK.step_rewards("2c0,3c1>132", a=47, b=85) == [0.0, 0.0, 1.0]
    # a consistent follow-through after a wrong step is charged only to that step
    assert TASK.step_rewards("2c0,2c1>122", a=47, b=85) == [0.0, 1.0, 0.0]
    # missing step: closed where the previous one was, reward 0
    assert TASK.step_rewards("2c1>132", a=47, b=85) == [1.0, 0.0, 1.0]
    assert TASK.step_char_ends("2c1>132", a=47, b=85) == [2, 2, 6]
    assert TASK.verify("2c1,3c1>132>1", a=47, b=85) == 0.0  # exactly one ">"


@settings(max_examples=60, deadline=None)
@given(seeds, difficulties)
def test_reference_completion_verifies_and_every_step_scores_one(seed, d):
    item = TASK.generate(seed, d)
    assert item == TASK.generate(seed, d)  # deterministic
    a, b = item.columns["a"], item.columns["b"]
    assert item.prompt == f"st {a}+{b}="
    assert TASK.verify(item.answer, **item.columns) == 1.0
    assert TASK.step_rewards(item.answer, **item.columns) == [1.0] * (d + 1)
    ends = TASK.step_char_ends(item.answer, **item.columns)
    assert ends[-1] == len(item.answer) - 1
    assert all(item.answer[e + 1] in ",>" for e in ends[:-1])  # each step ends before a separator
    assert set(item.prompt + item.answer) <= set(ALPHABET)
    assert len(str(a)) == d or (d == 1 and a == 0)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30), st.one_of(st.text(alphabet="0123456789c,> ", max_size=20)), difficulties,
       seeds)
def test_verifier_and_step_rewards_are_total(text, near_miss, d, seed):
    cols = TASK.generate(seed, d).columns
    for c in (text, near_miss, None, 3):
        assert TASK.verify(c, **cols) in (0.0, 1.0)
        rewards = TASK.step_rewards(c, **cols)
        assert len(rewards) == d + 1 and set(rewards) <= {0.0, 1.0}
    for c in (text, near_miss):
        ends = TASK.step_char_ends(c, **cols)
        assert len(ends) == d + 1 and ends == sorted(ends)
        assert all(0 <= e <= max(len(c) - 1, 0) for e in ends)


@settings(max_examples=60, deadline=None)
@given(seeds, difficulties, st.data())
def test_wrong_step_gets_zero_at_the_right_step(seed, d, data):
    item = TASK.generate(seed, d)
    steps = item.answer.split(">")[0].split(",")
    k = data.draw(st.integers(0, d - 1))
    digit, carry = int(steps[k][0]), int(steps[k][2])
    # wrong digit, carry kept: only step k fails (later steps use the same written carry)
    bad = steps.copy()
    bad[k] = f"{(digit + 1) % 10}c{carry}"
    rewards = TASK.step_rewards(",".join(bad) + ">" + item.answer.split(">")[1], **item.columns)
    assert rewards == [1.0] * k + [0.0] + [1.0] * (d - k)
    # wrong carry: step k fails, and so does step k+1 if it copies the true computation
    bad = steps.copy()
    bad[k] = f"{digit}c{1 - carry}"
    rewards = TASK.step_rewards(",".join(bad) + ">" + item.answer.split(">")[1], **item.columns)
    assert rewards[:k] == [1.0] * k and rewards[k] == 0.0
    if k + 1 < d:
        assert rewards[k + 1] == 0.0
    assert rewards[-1] == 1.0


def test_difficulty_and_seed_errors():
    with pytest.raises(ValueError, match="difficult"):
        TASK.generate(SEED_RANGES["train"][0], 4)
    with pytest.raises(TypeError):
        TASK.generate("seed", 1)


def test_process_rewards_feed_pure_min_form():
    """End to end: step rewards + char ends -> AdvantageInput -> PURE min-form values."""
    completions = ["2c1,3c1>132", "2c0,2c1>122"]  # the second is wrong at step 0
    T = max(len(c) for c in completions)
    sr = torch.tensor([TASK.step_rewards(c, a=47, b=85) for c in completions], dtype=torch.float64)
    ends = torch.tensor([TASK.step_char_ends(c, a=47, b=85) for c in completions])
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (T - len(c)) for c in completions],
                        dtype=torch.float64)
    out = torch.tensor([TASK.verify(c, a=47, b=85) for c in completions], dtype=torch.float64)
    inp = AdvantageInput(rewards=out[None], mask=mask[None], step_rewards=sr[None],
                         step_ends=ends[None])
    adv, _ = ADVANTAGES.get("pure")(inp, form="min")
    # values: correct one min(1,1,1) = 1 everywhere; wrong one [min(0,1,0), min(1,0), 0] = [0, 0, 0]
    # RLOO: correct 1 - 0 = 1 on all tokens; wrong 0 - 1 = -1 on all its tokens
    torch.testing.assert_close(adv[0], torch.stack([mask[0], -mask[1]]))
