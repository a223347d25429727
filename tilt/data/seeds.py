"""Seed arithmetic shared by training and evaluation (no imports: both sides read it).

``data_offset`` says where a training seed starts reading the train stream; the held-out
evaluation samples with its own generator, seeded ``cfg.seed + EVAL_SEED_OFFSET``, so
evaluation never disturbs the training RNG streams.
"""
from __future__ import annotations

EVAL_SEED_OFFSET = 12345  # the held-out evaluation samples with seed cfg.seed + this


def data_offset(seed: int) -> int:
    """Where seed ``seed`` starts reading the train stream: each seed sees different prompts."""
    return (seed % 97) * 10_000_000
