"""E6 Q-guided step search: best-first search over reasoning steps with a step-level Q as heuristic.

Q* (arXiv:2406.14283) and QLASS/step-level Q models score a partial solution by the value of the
steps taken so far; the search always expands the open partial solution with the highest score
(A* with f = Q), generating candidate next steps with the policy. Pure: the caller supplies the
step proposer, the scorer and the terminal test.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable


@dataclass(order=True)
class _Open:
    priority: float
    order: int
    node: Hashable = field(compare=False)


def best_first_search(start: Hashable, *, expand: Callable[[Hashable], Iterable[Hashable]],
                      score: Callable[[Hashable], float], is_terminal: Callable[[Hashable], bool],
                      max_expansions: int = 100) -> tuple[Hashable | None, int]:
    """Pop the highest-``score`` node; return the first terminal popped and the expansions used.

    Returns (None, expansions) when the budget runs out first. Ties pop in insertion order.
    """
    if max_expansions < 1:
        raise ValueError(f"max_expansions must be >= 1, got {max_expansions}")
    heap = [_Open(-score(start), 0, start)]
    count, expansions = 1, 0
    while heap and expansions < max_expansions:
        node = heapq.heappop(heap).node
        if is_terminal(node):
            return node, expansions
        expansions += 1
        for child in expand(node):
            heapq.heappush(heap, _Open(-score(child), count, child))
            count += 1
    return None, expansions
