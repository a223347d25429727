"""Honest evaluation: unbiased pass@k, the held-out table with its contamination check, and
aggregate statistics across seeds and tasks (catalogue G1-G3).

``tilt.evaluation.stats`` (rliable) is not imported here: it takes about a second to load and
only ``tilt compare`` needs it.
"""
from tilt.evaluation.passk import count_correct, pass_at_k, pass_at_k_from_rewards
from tilt.evaluation.report import build_eval_report, cell_key, check_seed_overlap, render_eval_table, seed_ranges

__all__ = [
    "build_eval_report",
    "cell_key",
    "check_seed_overlap",
    "count_correct",
    "pass_at_k",
    "pass_at_k_from_rewards",
    "render_eval_table",
    "seed_ranges",
]
