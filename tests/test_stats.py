"""Aggregate statistics (G1): tilt.evaluation.stats must agree with rliable called directly."""
from __future__ import annotations

import json

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics

from tilt.evaluation import stats

REPS = 300  # small for speed; the default is stats.DEFAULT_REPS = 2000


def _scores() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(7)
    return {
        "grpo": rng.uniform(0.2, 0.6, size=(5, 3)),  # [seeds, tasks]
        "rloo": rng.uniform(0.3, 0.7, size=(5, 3)),
        "dr_grpo": rng.uniform(0.1, 0.9, size=(4, 3)),  # a method may have fewer seeds
    }


def test_iqm_and_optimality_gap_match_rliable_called_directly():
    scores = _scores()
    got = stats.aggregate_intervals(scores, reps=REPS, seed=3)

    def func(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_optimality_gap(x, 1.0)])

    np.random.seed(3)  # rliable's bootstrap draws from the global NumPy state
    points, cis = rly.get_interval_estimates(scores, func, reps=REPS)
    for name in scores:
        assert got["iqm"][name].point == pytest.approx(points[name][0], abs=1e-12)
        assert got["optimality_gap"][name].point == pytest.approx(points[name][1], abs=1e-12)
        assert (got["iqm"][name].low, got["iqm"][name].high) == pytest.approx(tuple(cis[name][:, 0]), abs=1e-12)
        assert (got["optimality_gap"][name].low, got["optimality_gap"][name].high) == pytest.approx(
            tuple(cis[name][:, 1]), abs=1e-12)
        assert got["iqm"][name].low <= got["iqm"][name].point <= got["iqm"][name].high


def test_probability_of_improvement_matches_rliable_called_directly():
    scores = _scores()
    got = stats.improvement_intervals(scores, baseline="grpo", reps=REPS, seed=5)
    assert set(got) == {"rloo", "dr_grpo"}
    pairs = {name: [scores[name], scores["grpo"]] for name in ("rloo", "dr_grpo")}
    np.random.seed(5)
    points, cis = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=REPS)
    for name in pairs:
        assert got[name].point == pytest.approx(float(points[name]), abs=1e-12)
        assert (got[name].low, got[name].high) == pytest.approx(tuple(np.ravel(cis[name])), abs=1e-12)


def test_performance_profiles_match_rliable_called_directly():
    scores = _scores()
    taus = np.linspace(0, 1, 11)
    got = stats.performance_profiles(scores, taus=taus, reps=REPS, seed=2)
    np.random.seed(2)
    profiles, cis = rly.create_performance_profile(scores, taus, reps=REPS)
    for name in scores:
        np.testing.assert_allclose(got[name]["profile"], profiles[name], atol=1e-12)
        np.testing.assert_allclose(got[name]["low"], cis[name][0], atol=1e-12)
        np.testing.assert_allclose(got[name]["high"], cis[name][1], atol=1e-12)


def test_hand_computed_iqm_gap_improvement_and_profile():
    a = np.array([[0.1], [0.2], [0.3], [0.4]])  # [4 seeds, 1 task]
    b = np.array([[0.5], [0.6], [0.7], [0.8]])
    out = stats.compare_methods({"a": a, "b": b}, baseline="a", reps=50, seed=0)
    # IQM of 4 values trims int(0.25 * 4) = 1 from each end: mean(0.2, 0.3) = 0.25
    assert out["iqm"]["a"]["point"] == pytest.approx(0.25)
    # optimality gap (gamma = 1): 1 - mean(0.1, 0.2, 0.3, 0.4) = 1 - 0.25 = 0.75
    assert out["optimality_gap"]["a"]["point"] == pytest.approx(0.75)
    # every b run beats every a run: P(b > a) = 16/16 = 1, and so does every resample
    assert out["improvement_vs_baseline"]["b"] == pytest.approx({"point": 1.0, "low": 1.0, "high": 1.0})
    # profile at tau = 0.25: fraction of a's runs with score > 0.25 = 2/4
    tau = out["performance_profiles"]["a"]["tau"]
    assert out["performance_profiles"]["a"]["profile"][tau.index(0.25)] == pytest.approx(0.5)
    assert out["per_task_mean"]["b"] == pytest.approx([0.65])
    json.dumps(out)


def test_probability_of_improvement_hand_computed_with_ties():
    x = np.array([[0.3], [0.5]])
    y = np.array([[0.2], [0.4]])
    # pairs x > y: (.3,.2) yes, (.3,.4) no, (.5,.2) yes, (.5,.4) yes -> 3/4
    got = stats.improvement_intervals({"x": x, "y": y}, baseline="y", reps=20, seed=0)
    assert got["x"].point == pytest.approx(0.75)
    # identical scores count as a coin flip: 0.5
    same = stats.improvement_intervals({"x": y.copy(), "y": y}, baseline="y", reps=20, seed=0)
    assert same["x"].point == pytest.approx(0.5)


def test_bootstrap_is_seeded_and_leaves_global_rng_untouched():
    scores = _scores()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = stats.aggregate_intervals(scores, reps=100, seed=9)
    assert np.array_equal(np.random.get_state()[1], before)
    again = stats.aggregate_intervals(scores, reps=100, seed=9)
    other = stats.aggregate_intervals(scores, reps=100, seed=10)
    assert first == again
    assert first["iqm"]["grpo"] != other["iqm"]["grpo"]  # the seed does drive the resampling


def test_iqm_curves_match_rliable_per_point():
    rng = np.random.RandomState(0)
    curves = {"m": rng.rand(3, 2, 4)}  # [runs, tasks, points]
    got = stats.iqm_curves(curves, reps=REPS, seed=1)

    def func(x):
        return np.array([metrics.aggregate_iqm(x[..., j]) for j in range(x.shape[-1])])

    np.random.seed(1)
    points, cis = rly.get_interval_estimates(curves, func, reps=REPS)
    np.testing.assert_allclose(got["m"]["iqm"], points["m"], atol=1e-12)
    np.testing.assert_allclose([got["m"]["low"], got["m"]["high"]], cis["m"], atol=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same number of tasks"):
        stats.aggregate_intervals({"a": np.zeros((2, 3)), "b": np.zeros((2, 2))}, reps=10)
    with pytest.raises(ValueError, match=r"scores\['a'\] must be"):
        stats.aggregate_intervals({"a": np.zeros(3)}, reps=10)
    with pytest.raises(ValueError, match="non-finite"):
        stats.aggregate_intervals({"a": np.array([[np.nan]])}, reps=10)
    with pytest.raises(ValueError, match="baseline 'zzz'"):
        stats.improvement_intervals({"a": np.zeros((2, 1))}, baseline="zzz", reps=10)
