"""Unbiased pass@k (G2) and the held-out evaluation table / contamination check (G3)."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from tilt.evaluation import (
    build_eval_report,
    check_seed_overlap,
    pass_at_k,
    pass_at_k_from_rewards,
    render_eval_table,
    seed_ranges,
)
from tilt.tasks.base import SEED_RANGES, Item


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@st.composite
def nck(draw):
    n = draw(st.integers(1, 8))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=150, deadline=None)
@given(nck())
def test_pass_at_k_equals_brute_force_enumeration_of_k_subsets(args):
    n, c, k = args
    assert float(pass_at_k(n, c, k=k)) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4 (= c/n)
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
        (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4 = 0.75
        (3, 2, 2, 1.0),  # n - c = 1 < k = 2: every pair holds a correct sample
        (6, 0, 4, 0.0),  # no correct sample
        (6, 6, 1, 1.0),  # all correct
        # 1 - C(197,100)/C(200,100) = 1 - (98*99*100)/(198*199*200) = 1 - 970200/7880400
        (200, 3, 100, 1 - 970200 / 7880400),
    ],
)
def test_pass_at_k_hand_computed_values(n, c, k, expected):
    assert float(pass_at_k(n, c, k=k)) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials_without_overflow():
    # C(2000, 500) has ~490 digits: the product form must still match exact rational arithmetic.
    n, c, k = 2000, 7, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert float(pass_at_k(n, c, k=k)) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_vectorised_over_items_with_different_n():
    n = np.array([5, 4, 8, 2])  # [P]
    c = np.array([2, 1, 0, 2])  # [P]
    got = pass_at_k(n, c, k=2)  # [P]
    expected = [float(pass_at_k(int(a), int(b), k=2)) for a, b in zip(n, c)]
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, atol=0)
    # 1 - C(3,2)/C(5,2) = 0.7 ; 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 ; 0 ; n - c = 0 < 2 -> 1
    np.testing.assert_allclose(got, [0.7, 0.5, 0.0, 1.0], atol=1e-12)


def test_pass_at_k_errors_name_the_problem():
    with pytest.raises(ValueError, match="k=4"):
        pass_at_k([5, 3], [1, 1], k=4)  # 3 samples cannot give pass@4
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(3, 1, k=0)
    with pytest.raises(ValueError, match="same shape"):
        pass_at_k([3, 3], [1], k=1)


def test_pass_at_k_from_rewards_uses_threshold():
    rewards = [[1.0, 0.5, 0.0, 1.0], [0.9, 0.9, 0.9, 0.9]]
    # threshold 1: c = [2, 0] -> pass@1 = [2/4, 0]
    np.testing.assert_allclose(pass_at_k_from_rewards(rewards, k=1), [0.5, 0.0])
    # threshold 0.5: c = [3, 4] -> pass@2 = [1 - C(1,2)/C(4,2) = 1, 1]
    np.testing.assert_allclose(pass_at_k_from_rewards(rewards, k=2, threshold=0.5), [1.0, 1.0])


# ---------------------------------------------------------------- evaluation table (G2, G3)


@dataclass
class FakeResult:
    item: Item
    sample_rewards: list[float]
    greedy_reward: float


EVAL0 = SEED_RANGES["eval"][0]


def _item(task: str, difficulty: int, seed: int) -> Item:
    return Item(task=task, difficulty=difficulty, seed=seed, prompt="p", answer="a")


def _results() -> list[FakeResult]:
    return [
        FakeResult(_item("addition", 1, EVAL0 + 0), [1, 0, 0, 1], 1.0),
        FakeResult(_item("addition", 1, EVAL0 + 1), [0, 0, 0, 0], 0.0),
        FakeResult(_item("addition", 2, EVAL0 + 2), [1, 1, 1, 1], 0.0),
        FakeResult(_item("sorting", 1, EVAL0 + 3), [0, 1, 0, 0], 1.0),
    ]


def test_eval_report_hand_computed_table():
    report = build_eval_report(_results(), ks=(1, 2))
    rows = {row["cell"]: row for row in report["rows"]}
    assert list(rows) == ["addition:1", "addition:2", "sorting:1", "addition", "sorting", "all"]
    # addition:1: greedy (1 + 0)/2 = 0.5; pass@1 (2/4 + 0)/2 = 0.25;
    # pass@2 = (1 - C(2,2)/C(4,2) + 0)/2 = (1 - 1/6)/2 = 5/12
    assert rows["addition:1"]["greedy"] == pytest.approx(0.5)
    assert rows["addition:1"]["pass1"] == pytest.approx(0.25)
    assert rows["addition:1"]["pass2"] == pytest.approx(5 / 12)
    # addition (3 items): greedy 1/3; pass@1 (0.5 + 0 + 1)/3 = 0.5; pass@2 (5/6 + 0 + 1)/3 = 11/18
    assert rows["addition"]["greedy"] == pytest.approx(1 / 3)
    assert rows["addition"]["pass1"] == pytest.approx(0.5)
    assert rows["addition"]["pass2"] == pytest.approx(11 / 18)
    # sorting:1: pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert rows["sorting:1"]["pass2"] == pytest.approx(0.5)
    # all (4 items): greedy 2/4; pass@1 (0.5 + 0 + 1 + 0.25)/4 = 0.4375
    assert rows["all"]["greedy"] == pytest.approx(0.5)
    assert rows["all"]["pass1"] == pytest.approx(0.4375)
    assert report["per_cell"]["addition:2"] == {"greedy": 0.0, "pass1": 1.0, "pass2": 1.0}
    assert report["eval_seeds"]["eval"]["addition"]["count"] == 3
    json.dumps(report)  # JSON-serialisable


def test_eval_report_carries_contaminated_flag_into_table():
    report = build_eval_report(_results(), ks=(1,), contaminated=True, seeds={"train": {}})
    assert report["contaminated"] is True and report["train_seeds"] == {"train": {}}
    console = Console(record=True, width=150)
    console.print(render_eval_table(report))
    text = console.export_text()
    assert "CONTAMINATED" in text and "0.438" in text  # all-row pass@1 0.4375 -> 0.438
    clean = Console(record=True, width=150)
    clean.print(render_eval_table(build_eval_report(_results(), ks=(1,))))
    assert "CONTAMINATED" not in clean.export_text()


def test_eval_report_refuses_k_above_samples():
    with pytest.raises(ValueError, match="pass@8"):
        build_eval_report(_results(), ks=(1, 8))


def test_seed_overlap_flags_items_from_training_range(tmp_path):
    train0 = SEED_RANGES["train"][0]
    # what tilt.tasks.mix.seed_report writes: {split: {task: {min_seed, max_seed, ...}}}
    seeds = {"train": {"addition": {"min_seed": train0, "max_seed": train0 + 9, "count": 10, "difficulties": [1]}},
             "eval": {}}
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps(seeds))
    items = [
        _item("addition", 1, train0 + 9),  # inside [train0, train0 + 10): contaminated
        _item("addition", 1, train0 + 10),  # just past the inclusive max_seed: clean
        _item("sorting", 1, train0 + 3),  # the range was for addition only: clean
        _item("addition", 2, EVAL0),  # held-out seed: clean
        _item("sorting", 1, 5),  # SFT seed of the shipped base model: contaminated
    ]
    problems = check_seed_overlap(path, items)
    assert len(problems) == 2
    assert f"seed {train0 + 9}" in problems[0] and "RL training" in problems[0]
    assert "seed 5" in problems[1] and "SFT" in problems[1]
    assert check_seed_overlap(seeds, items, include_sft=False) == problems[:1]
    assert check_seed_overlap(seeds, [_item("addition", 1, EVAL0)]) == []


def test_seed_ranges_accepts_the_documented_forms():
    assert seed_ranges([3, 7]) == [(None, 3, 7)]
    assert seed_ranges({"start": 3, "stop": 7}) == [(None, 3, 7)]
    assert seed_ranges({"min_seed": 3, "max_seed": 7}) == [(None, 3, 8)]  # inclusive max
    assert seed_ranges({"addition": [[1, 2], [5, 9]]}) == [("addition", 1, 2), ("addition", 5, 9)]
    with pytest.raises(ValueError, match="cannot read a seed range"):
        seed_ranges("1-5")
