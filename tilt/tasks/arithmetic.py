"""Addition and multiplication: "47+85=" -> "132", "47*8=" -> "376" (catalogue G3).

Also holds the three helpers every task here shares: the seeded generator, the argument
check and the exact-match verifier.
"""
from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from typing import Any, Callable

from tilt.tasks.base import Item


def seeded_rng(task: str, difficulty: int, seed: int) -> random.Random:
    """A generator private to one item. A str seed is hashed with SHA-512 by ``random``,
    so the stream is the same in every process (PYTHONHASHSEED plays no part)."""
    return random.Random(f"{task}:{difficulty}:{seed}")


def check_item_args(task: Any, seed: int, difficulty: int) -> tuple[int, int]:
    """Normalise ``seed`` and ``difficulty`` to plain ints (so numpy ints name the same item),
    or raise ``ValueError`` listing the valid difficulties of ``task``."""
    try:
        seed, difficulty = int(operator.index(seed)), int(operator.index(difficulty))
    except TypeError:
        raise TypeError(f"{task.name}: seed and difficulty must be integers, "
                        f"got seed={seed!r}, difficulty={difficulty!r}") from None
    if difficulty not in task.difficulties:
        valid = ", ".join(map(str, task.difficulties))
        raise ValueError(f"{task.name}: unknown difficulty {difficulty}; valid difficulties: {valid}")
    return seed, difficulty


def exact_match(completion: Any, answer: str) -> float:
    """1.0 iff ``completion`` with surrounding whitespace stripped equals ``answer``; total
    (a non-string completion scores 0.0)."""
    if not isinstance(completion, str):
        return 0.0
    return float(completion.strip() == answer)


Range = tuple[int, int]  # inclusive (low, high)


@dataclass(frozen=True)
class ArithmeticTask:
    """``a <symbol> b =`` with a and b drawn uniformly from the difficulty's operand ranges;
    the answer is the exact integer result in decimal. Exact-match verifier."""

    name: str
    symbol: str
    combine: Callable[[int, int], int]
    operand_ranges: dict[int, tuple[Range, Range]]  # difficulty -> (left range, right range)
    difficulties: tuple[int, ...] = (1, 2, 3)

    def generate(self, seed: int, difficulty: int) -> Item:
        """The item for (seed, difficulty); deterministic."""
        seed, difficulty = check_item_args(self, seed, difficulty)
        rng = seeded_rng(self.name, difficulty, seed)
        (lo_a, hi_a), (lo_b, hi_b) = self.operand_ranges[difficulty]
        a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
        answer = str(self.combine(a, b))
        prompt = f"{a}{self.symbol}{b}="
        return Item(self.name, difficulty, seed, prompt, answer, {"answer": answer})

    def verify(self, completion: str, *, answer: str) -> float:
        """1.0 iff the stripped completion is exactly ``answer``, else 0.0."""
        return exact_match(completion, answer)


ONE_DIGIT_FROM_0, ONE_DIGIT, TWO_DIGIT, THREE_DIGIT = (0, 9), (1, 9), (10, 99), (100, 999)

ADDITION = ArithmeticTask(
    name="addition",
    symbol="+",
    combine=operator.add,
    # d = digits of each operand; d=1 includes 0.
    operand_ranges={1: (ONE_DIGIT_FROM_0, ONE_DIGIT_FROM_0),
                    2: (TWO_DIGIT, TWO_DIGIT),
                    3: (THREE_DIGIT, THREE_DIGIT)},
)

MULTIPLICATION = ArithmeticTask(
    name="multiplication",
    symbol="*",
    combine=operator.mul,
    # d=1: 1-digit x 1-digit, d=2: 2-digit x 1-digit, d=3: 2-digit x 2-digit (no zero factor).
    operand_ranges={1: (ONE_DIGIT, ONE_DIGIT),
                    2: (TWO_DIGIT, ONE_DIGIT),
                    3: (TWO_DIGIT, TWO_DIGIT)},
)
