"""Aggregate statistics across seeds and tasks with rliable (catalogue G1).

Every statistic here is computed by the ``rliable`` library (Agarwal et al. 2021,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice", arXiv:2108.13264);
this module only shapes the inputs, fixes the bootstrap seed and returns plain numbers.

Input everywhere: ``scores: dict[method, np.ndarray]`` with arrays [n_runs, n_tasks]
(runs are seeds). Scores are assumed normalised to [0, 1] (accuracies), so the optimality
gap uses gamma = 1 unless told otherwise.

Reproducibility: rliable's stratified bootstrap draws its indices from NumPy's *global*
random state (``np.random.choice`` in ``StratifiedBootstrap.update_indices``), so each
bootstrap call below seeds that state and restores the caller's state afterwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
from rliable import library as rly
from rliable import metrics

DEFAULT_REPS = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval [low, high]."""

    point: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed NumPy's global RNG (which rliable's bootstrap uses) and restore it on exit."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check_scores(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate shapes: every method [n_runs >= 1, n_tasks], same n_tasks everywhere."""
    if not scores:
        raise ValueError("scores is empty: need at least one method")
    out = {name: np.asarray(s, dtype=np.float64) for name, s in scores.items()}
    n_tasks = {name: s.shape[1] if s.ndim == 2 else None for name, s in out.items()}
    for name, s in out.items():
        if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
            raise ValueError(f"scores[{name!r}] must be [n_runs>=1, n_tasks>=1], got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"scores[{name!r}] has non-finite values: {s.tolist()}")
    if len(set(n_tasks.values())) != 1:
        raise ValueError(f"every method needs the same number of tasks, got {n_tasks}")
    return out


def _intervals(points: dict, cis: dict, index: int) -> dict[str, Interval]:
    """Unpack rliable's (point, [2, M] CI) dicts at output position ``index``."""
    return {
        name: Interval(float(np.atleast_1d(points[name])[index]), float(cis[name][0, index]), float(cis[name][1, index]))
        for name in points
    }


def aggregate_func(*, gamma: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic bootstrapped by ``aggregate_intervals``: [IQM, optimality gap]."""

    def func(x: np.ndarray) -> np.ndarray:  # x: [n_runs, n_tasks]
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_optimality_gap(x, gamma)])

    return func


def aggregate_intervals(
    scores: Mapping[str, np.ndarray],
    *,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    gamma: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, Interval]]:
    """IQM and optimality gap per method with stratified-bootstrap CIs.

    Args:
        scores: method -> [n_runs, n_tasks].
        reps: bootstrap replications; confidence: CI coverage; gamma: optimality threshold.
        seed: seed of the bootstrap resampling.
    Returns:
        {"iqm": {method: Interval}, "optimality_gap": {method: Interval}}.
    Reference: IQM and optimality gap, Sec. 4.3, arXiv:2108.13264 (``rliable.metrics``).
    """
    checked = _check_scores(scores)
    func = aggregate_func(gamma=gamma)
    with seeded_numpy(seed):
        points, cis = rly.get_interval_estimates(checked, func, reps=reps, confidence_interval_size=confidence)
    return {"iqm": _intervals(points, cis, 0), "optimality_gap": _intervals(points, cis, 1)}


def improvement_intervals(
    scores: Mapping[str, np.ndarray],
    *,
    baseline: str,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """P(method > baseline) for every method other than the baseline, with bootstrap CIs.

    Each pair is resampled independently per method (``StratifiedIndependentBootstrap``).
    Returns {method: Interval}. Reference: Sec. 4.3, arXiv:2108.13264
    (``rliable.metrics.probability_of_improvement``).
    """
    checked = _check_scores(scores)
    if baseline not in checked:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(checked)}")
    pairs = {name: [s, checked[baseline]] for name, s in checked.items() if name != baseline}
    if not pairs:
        return {}
    func = metrics.probability_of_improvement
    with seeded_numpy(seed):
        points, cis = rly.get_interval_estimates(pairs, func, reps=reps, confidence_interval_size=confidence)
    return _intervals(points, {name: np.asarray(ci).reshape(2, 1) for name, ci in cis.items()}, 0)


def change_intervals(
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    *,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Mean paired change after - before per method, with a stratified-bootstrap CI.

    ``before[m]`` and ``after[m]`` are [n_runs, n_tasks] with row i the same run; the statistic is
    mean(after - before) over runs and tasks, the runs resampled within each task
    (``rliable.library.get_interval_estimates``, as for the aggregates).
    """
    diffs = {}
    for name, b in _check_scores(before).items():
        a = np.asarray(after[name], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"before[{name!r}] has shape {b.shape} but after has {a.shape}")
        diffs[name] = a - b
    with seeded_numpy(seed):
        points, cis = rly.get_interval_estimates(diffs, lambda x: np.array([x.mean()]), reps=reps,
                                                 confidence_interval_size=confidence)
    return _intervals(points, cis, 0)


def performance_profiles(
    scores: Mapping[str, np.ndarray],
    *,
    taus: np.ndarray | None = None,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Score-distribution performance profiles: fraction of runs with score > tau.

    Args:
        taus: thresholds (default 0, 0.025, ..., 1 for scores in [0, 1]).
    Returns:
        {method: {"tau": [...], "profile": [...], "low": [...], "high": [...]}}.
    Reference: Sec. 4.2, arXiv:2108.13264 (``rliable.library.create_performance_profile``).
    """
    checked = _check_scores(scores)
    taus = np.linspace(0.0, 1.0, 41) if taus is None else np.asarray(taus, dtype=np.float64)
    with seeded_numpy(seed):
        profiles, cis = rly.create_performance_profile(checked, taus, reps=reps, confidence_interval_size=confidence)
    return {
        name: {
            "tau": taus.tolist(),
            "profile": np.asarray(profiles[name]).tolist(),
            "low": np.asarray(cis[name][0]).tolist(),
            "high": np.asarray(cis[name][1]).tolist(),
        }
        for name in checked
    }


def iqm_curves(
    curves: Mapping[str, np.ndarray], *, reps: int = DEFAULT_REPS, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """IQM at each evaluation point of a learning curve, with stratified-bootstrap CIs.

    Args:
        curves: method -> [n_runs, n_tasks, n_points].
    Returns:
        {method: {"iqm": [n_points], "low": [...], "high": [...]}}.
    Reference: sample-efficiency curves, Fig. 9, arXiv:2108.13264.
    """
    arrays = {name: np.asarray(c, dtype=np.float64) for name, c in curves.items()}
    for name, c in arrays.items():
        if c.ndim != 3 or min(c.shape) < 1:
            raise ValueError(f"curves[{name!r}] must be [n_runs, n_tasks, n_points], got shape {c.shape}")

    def func(x: np.ndarray) -> np.ndarray:  # x: [n_runs, n_tasks, n_points]
        return np.array([metrics.aggregate_iqm(x[..., j]) for j in range(x.shape[-1])])

    with seeded_numpy(seed):
        points, cis = rly.get_interval_estimates(arrays, func, reps=reps, confidence_interval_size=confidence)
    return {
        name: {"iqm": points[name].tolist(), "low": cis[name][0].tolist(), "high": cis[name][1].tolist()}
        for name in arrays
    }


def compare_methods(
    scores: Mapping[str, np.ndarray],
    *,
    baseline: str,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Everything a comparison report needs, JSON-serialisable.

    Returns {"iqm", "optimality_gap", "improvement_vs_baseline"} as {method: Interval dict},
    plus "performance_profiles", "per_task_mean" ({method: [n_tasks]}), "n_runs", "reps",
    "confidence", "seed", "baseline".
    """
    checked = _check_scores(scores)
    agg = aggregate_intervals(checked, reps=reps, confidence=confidence, seed=seed)
    poi = improvement_intervals(checked, baseline=baseline, reps=reps, confidence=confidence, seed=seed)
    return {
        "baseline": baseline,
        "reps": reps,
        "confidence": confidence,
        "seed": seed,
        "n_runs": {name: int(s.shape[0]) for name, s in checked.items()},
        "iqm": {name: iv.to_dict() for name, iv in agg["iqm"].items()},
        "optimality_gap": {name: iv.to_dict() for name, iv in agg["optimality_gap"].items()},
        "improvement_vs_baseline": {name: iv.to_dict() for name, iv in poi.items()},
        "performance_profiles": performance_profiles(checked, reps=reps, confidence=confidence, seed=seed),
        "per_task_mean": {name: s.mean(axis=0).tolist() for name, s in checked.items()},
    }
