"""Sorting: "sort 53 7 21:" -> "7 21 53" (catalogue G3)."""
from __future__ import annotations

from dataclasses import dataclass

from tilt.tasks.arithmetic import check_item_args, exact_match, seeded_rng
from tilt.tasks.base import Item


@dataclass(frozen=True)
class SortingTask:
    """Sort d+2 numbers drawn uniformly from 0..99 (duplicates allowed) ascending, written
    with single spaces. Exact-match verifier."""

    name: str = "sorting"
    difficulties: tuple[int, ...] = (1, 2, 3)
    low: int = 0
    high: int = 99

    def generate(self, seed: int, difficulty: int) -> Item:
        """The item for (seed, difficulty); deterministic."""
        seed, difficulty = check_item_args(self, seed, difficulty)
        rng = seeded_rng(self.name, difficulty, seed)
        numbers = [rng.randint(self.low, self.high) for _ in range(difficulty + 2)]
        prompt = "sort " + " ".join(map(str, numbers)) + ":"
        answer = " ".join(map(str, sorted(numbers)))
        return Item(self.name, difficulty, seed, prompt, answer, {"answer": answer})

    def verify(self, completion: str, *, answer: str) -> float:
        """1.0 iff the stripped completion is exactly ``answer``, else 0.0."""
        return exact_match(completion, answer)


SORTING = SortingTask()
