"""math_verify and format rewards on hand-checked cases."""
from __future__ import annotations

import pytest

from tilt.config import ConfigError
from tilt.rewards import resolve_reward_fn, score
from tilt.verifiers.maths import make_format

# (completion, gold, expected): equivalent forms score 1, wrong answers 0.
MATH_CASES = [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),         # boxed fraction = decimal
    ("so x = \\boxed{\\dfrac{2}{4}}", "\\frac12", 1.0),           # \dfrac{2}{4} = 1/2, gold without $
    ("$\\sqrt{4}$", "2", 1.0),                                    # sqrt(4) = 2
    ("We get 42.", "42", 1.0),                                    # plain number in text
    ("\\boxed{3}", "$3$", 1.0),                                   # gold in $...$
    ("\\boxed{2}", "3", 0.0),                                     # wrong
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),                        # 1/3 != 1/2
    ("I do not know.", "7", 0.0),                                 # no answer at all
]


@pytest.mark.parametrize("completion, gold, expected", MATH_CASES)
def test_math_verify_hand_checked(completion, gold, expected):
    fn = resolve_reward_fn("math_verify")
    assert fn(["q"], [completion], solution=[gold]) == [expected]


def test_math_verify_reads_either_convention_and_runs_in_the_scoring_thread():
    comps = [c for c, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    want = [e for _, _, e in MATH_CASES]
    fn = resolve_reward_fn("math_verify")
    # tilt's task-row convention: one dict of columns per completion, gold under "answer"
    r, counts, msgs = score([fn], [1.0], ["q"] * len(comps), comps, {"columns": [{"answer": g} for g in golds]},
                            timeout=60)
    assert r == want and not msgs  # the call runs in a worker thread: math-verify's alarm must be off


def test_math_verify_without_a_gold_column_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a 'solution' nor an 'answer' column"):
        resolve_reward_fn("math_verify")(["q"], ["\\boxed{1}"], task=["x"])


def test_format_default_pattern():
    fn = resolve_reward_fn("format")
    comps = ["<think>2+2 is 4</think><answer>4</answer>",         # exact
             "<think>\nmulti\nline\n</think>\n<answer>4</answer>\n",  # newlines inside and around
             "<answer>4</answer>",                                 # no think block
             "<think>x</think><answer>4</answer> trailing words",  # text after the answer
             "<answer>4</answer><think>x</think>"]                 # wrong order
    assert fn(["q"] * 5, comps) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_pattern_is_configurable_and_checked():
    fn = make_format(r"\d+")
    assert fn(["q"] * 3, ["123", "12a", ""]) == [1.0, 0.0, 0.0]
    # a row's own pattern replaces the default for that row
    assert fn(["q"] * 2, ["abc", "abc"], format_pattern=[None, "[a-c]+"]) == [0.0, 1.0]
    with pytest.raises(ConfigError, match="pattern '\\(' is not a valid regular expression"):
        make_format("(")
