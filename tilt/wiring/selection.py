"""The batch filter of the configured selector, applied after the advantages (catalogue D2, D3).

A selector's registry entry names its LearnerBatch adapter (meta ``apply``: ``fn(batch, ctx,
**kwargs) -> (batch, metrics)``) when it filters a scored batch, or its sampler (meta ``draw``)
when it acts while drawing prompts (DAPO dynamic sampling). Advantages are computed on the full
groups before a filter drops rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from tilt.learner import LearnerBatch


@dataclass
class SelectContext:
    """What a filter may read about the batch it filters."""

    adv: Tensor  # [B, G, T] advantages
    rewards: Tensor  # [B, G]
    entropy: Optional[Tensor]  # [N, T] sampling-policy entropy (the "entropy" provider)
    step: int  # 1-based RL step
    total_steps: int = 1  # RL steps of the run
    generator: Optional[torch.Generator] = None  # the run's sampler (random strategies)


Filter = Callable[[LearnerBatch, SelectContext], tuple[LearnerBatch, dict[str, float]]]


def keep_all(batch: LearnerBatch, ctx: SelectContext) -> tuple[LearnerBatch, dict[str, float]]:
    return batch, {}


def make_filter(method) -> Filter:
    """The batch filter of a resolved selector (``tilt.wiring.resolve.Method``), or keep_all for
    none or a selector that acts while drawing."""
    apply = method.entry.meta.get("apply") if method is not None else None
    return partial(apply, **method.fn_kwargs) if apply is not None else keep_all
