"""Unbiased pass@k (catalogue G2).

Draw n samples per problem, count the c correct ones, and estimate the probability that at
least one of k samples drawn without replacement is correct:

    pass@k = 1 - C(n - c, k) / C(n, k)                      (Eq. 1, arXiv:2107.03374)

The ratio of binomials is evaluated as the product prod_{i=n-c+1}^{n} (1 - k / i), the
numerically stable form given with the estimator in the same paper; it never forms a large
binomial coefficient.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: np.ndarray | Sequence[int] | int, c: np.ndarray | Sequence[int] | int, *, k: int) -> np.ndarray:
    """Unbiased pass@k for each problem, vectorised over problems.

    Args:
        n: samples drawn per problem, shape [P] (or a scalar).
        c: correct samples per problem, shape [P], with 0 <= c <= n.
        k: samples the estimate is for; 1 <= k <= n for every problem.
    Returns:
        float64 array [P] (0-d for scalar inputs) of pass@k values in [0, 1].
    Reference: Eq. 1 and its product form, arXiv:2107.03374 (Chen et al. 2021).
    """
    n_arr = np.asarray(n, dtype=np.int64)  # [P]
    c_arr = np.asarray(c, dtype=np.int64)  # [P]
    if n_arr.shape != c_arr.shape:
        raise ValueError(f"n and c must have the same shape, got {n_arr.shape} and {c_arr.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError(f"need 0 <= c <= n for every problem, got n={n_arr.tolist()} c={c_arr.tolist()}")
    if np.any(n_arr < k):
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n_arr.tolist()}")
    if n_arr.size == 0:
        return np.zeros(n_arr.shape, dtype=np.float64)
    i = np.arange(1, int(n_arr.max()) + 1, dtype=np.float64)  # [I] candidate factors 1..max n
    lo = (n_arr - c_arr)[..., None]  # [P, 1] product runs over i in (n - c, n]
    hi = n_arr[..., None]  # [P, 1]
    in_product = (i > lo) & (i <= hi)  # [P, I]
    factors = np.where(in_product, 1.0 - k / i, 1.0)  # [P, I]
    # When n - c < k every k-subset holds a correct sample: i = k is then in the product, its
    # factor is exactly 0, and pass@k comes out exactly 1 as C(n - c, k) = 0 requires.
    return 1.0 - factors.prod(axis=-1)  # [P]


def count_correct(sample_rewards: Sequence[float], *, threshold: float = 1.0) -> int:
    """Number of samples whose reward is >= ``threshold`` (a sample "passes")."""
    return int(sum(1 for r in sample_rewards if r >= threshold))


def pass_at_k_from_rewards(
    sample_rewards: Sequence[Sequence[float]], *, k: int, threshold: float = 1.0
) -> np.ndarray:
    """pass@k per problem from per-sample rewards; a sample passes when reward >= threshold.

    Args:
        sample_rewards: one list of n_p sample rewards per problem (n_p may differ).
        k: as in ``pass_at_k``.
        threshold: reward needed for a sample to count as correct.
    Returns:
        float64 array [P].
    """
    n = [len(r) for r in sample_rewards]
    c = [count_correct(r, threshold=threshold) for r in sample_rewards]
    return pass_at_k(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64), k=k)
