"""Exact harness: problems small enough to enumerate every completion, so any loss's
expected value and gradient, and the closed-form optimum pi* = pi_ref exp(r/beta) / Z,
are computed exactly. Used by tests (fixed-point checks) and by users checking a new loss.
"""
from tilt.exact.bandit import Bandit, make_bandit
from tilt.exact.enumeration import (
    Enumeration,
    exact_expectation,
    exact_gradient,
    expected_loss,
    group_mean,
    policy_input,
    sequence_probs,
    table_logp,
    total_variation,
)
from tilt.exact.solve import maximize_objective, optimal_policy, solve, tilted_distribution
from tilt.exact.targets import (
    forward_kl_optimum,
    forward_kl_tilt,
    per_state_fixed_point,
    reverse_kl_tilt,
    state_visit_probs,
    tsallis_optimum,
    tsallis_tilt,
)
from tilt.exact.tree import TokenTree, level_offset, make_needle_tree, make_tree

__all__ = [
    "Bandit", "Enumeration", "TokenTree", "exact_expectation", "exact_gradient", "expected_loss",
    "forward_kl_optimum", "forward_kl_tilt", "group_mean", "level_offset", "make_bandit", "make_tree",
    "make_needle_tree", "maximize_objective", "optimal_policy", "per_state_fixed_point", "policy_input", "reverse_kl_tilt",
    "sequence_probs", "solve", "state_visit_probs", "table_logp", "tilted_distribution", "total_variation",
    "tsallis_optimum", "tsallis_tilt",
]

from tilt.exact.decoders import (  # noqa: E402
    best_of_n_kl_bound,
    best_of_n_probs,
    blockwise_k_sequences,
    blockwise_sequences,
    decoded_sequences,
    decoded_table,
    future_return_q,
    indirect_transfer_q,
    resample_probs,
    win_rate,
)

__all__ += ["best_of_n_kl_bound", "best_of_n_probs", "blockwise_k_sequences", "blockwise_sequences",
            "decoded_sequences", "decoded_table", "future_return_q", "indirect_transfer_q", "resample_probs",
            "win_rate"]
