"""Step-wise addition with verifiable process rewards (for catalogue C4, PURE).

The model adds column by column from the right, writing for each column the result digit and
the carry out, then the sum:

    prompt "st 47+85="   completion "2c1,3c1>132"  ("st" keeps it apart from `addition`)
    column 0: 7 + 5 + 0 = 12 -> digit 2, carry 1 -> "2c1"
    column 1: 4 + 8 + 1 = 13 -> digit 3, carry 1 -> "3c1"
    answer:   132

Steps are "<digit>c<carry>" joined by ",", then ">" and the sum. Both operands have exactly d
digits (d = 1 includes 0), so there are d column steps plus the answer step.

* ``verify`` (outcome reward): 1.0 iff the completion has exactly one ">" and the text after it,
  stripped, is the sum.
* ``step_rewards`` (process reward, one per step): column step k scores 1.0 iff it parses and is
  right given the carry the completion itself wrote at step k-1 (the true carry if that step did
  not parse), so an error is charged to the step that made it; the answer step scores like
  ``verify``. ``step_char_ends`` gives each step's last character (= token index with the
  character tokenizer), for ``AdvantageInput.step_ends``; the lead registers the task.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tilt.tasks.arithmetic import check_item_args, seeded_rng
from tilt.tasks.base import Item

STEP = re.compile(r"(\d)c(\d)")
OPERAND_RANGES = {1: (0, 9), 2: (10, 99), 3: (100, 999)}


def column_digits(x: int, n: int) -> list[int]:
    """The n lowest decimal digits of x, least significant first."""
    return [(x // 10 ** k) % 10 for k in range(n)]


def reference_completion(a: int, b: int, n: int) -> str:
    """The correct completion for a + b with n column steps."""
    steps, carry = [], 0
    for da, db in zip(column_digits(a, n), column_digits(b, n)):
        total = da + db + carry
        carry = total // 10
        steps.append(f"{total % 10}c{carry}")
    return ",".join(steps) + f">{a + b}"


def split_steps(completion: str) -> tuple[list[tuple[str, int]], tuple[str, int] | None]:
    """Column steps and the answer as (text, index of its last char in ``completion``).

    The answer is None unless the completion has exactly one ">"."""
    body, sep, answer = completion.partition(">")
    steps, start = [], 0
    for piece in body.split(","):
        steps.append((piece, start + len(piece) - 1))
        start += len(piece) + 1
    if not sep or ">" in answer:
        return steps, None
    end = len(completion.rstrip()) - 1
    return steps, (answer, end)


@dataclass(frozen=True)
class AdditionStepsTask:
    """Column-wise addition "a+b=" -> "d0cC0,d1cC1,...>sum" with per-step verifiable rewards."""

    name: str = "addition_steps"
    difficulties: tuple[int, ...] = (1, 2, 3)

    def generate(self, seed: int, difficulty: int) -> Item:
        """The item for (seed, difficulty); deterministic. ``answer`` is the full reference
        completion (what SFT teaches); columns are the operands."""
        seed, difficulty = check_item_args(self, seed, difficulty)
        rng = seeded_rng(self.name, difficulty, seed)
        lo, hi = OPERAND_RANGES[difficulty]
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        answer = reference_completion(a, b, difficulty)
        return Item(self.name, difficulty, seed, f"st {a}+{b}=", answer, {"a": a, "b": b})

    def verify(self, completion: Any, *, a: int, b: int, **_: Any) -> float:
        """Outcome reward: 1.0 iff exactly one ">" and the stripped text after it is a + b."""
        if not isinstance(completion, str):
            return 0.0
        _, answer = split_steps(completion)
        return float(answer is not None and answer[0].strip() == str(a + b))

    def step_rewards(self, completion: Any, *, a: int, b: int, **_: Any) -> list[float]:
        """Process rewards: one per column step (d of them) plus the answer step; total."""
        n = max(len(str(a)), len(str(b)))
        if not isinstance(completion, str):
            return [0.0] * (n + 1)
        steps, _ = split_steps(completion)
        out, true_carry, carry_in = [], 0, 0
        for k, (da, db) in enumerate(zip(column_digits(a, n), column_digits(b, n))):
            total = da + db + carry_in
            parsed = STEP.fullmatch(steps[k][0].strip()) if k < len(steps) else None
            want = (total % 10, total // 10)
            ok = parsed is not None and (int(parsed[1]), int(parsed[2])) == want
            out.append(float(ok))
            true_total = da + db + true_carry
            true_carry = true_total // 10
            carry_in = int(parsed[2]) if parsed is not None else true_carry
        out.append(self.verify(completion, a=a, b=b))
        return out

    def step_char_ends(self, completion: str, *, a: int, b: int, **_: Any) -> list[int]:
        """Index of the last character of each of the d + 1 steps in ``completion``.

        Non-decreasing and >= 0: a missing column step is closed where the previous step was
        (a missing answer at the last character), so it spans no token but its 0 reward still
        counts in the min-form value of the steps before it (``tilt.advantages.process``)."""
        n = max(len(str(a)), len(str(b)))
        steps, answer = split_steps(completion)
        last = max(len(completion.rstrip()) - 1, 0)
        raw = [steps[k][1] if k < len(steps) else -1 for k in range(n)]
        raw.append(answer[1] if answer is not None else last)
        ends, run = [], 0
        for e in raw:
            run = max(run, min(max(e, 0), max(len(completion) - 1, 0)))
            ends.append(run)
        return ends


ADDITION_STEPS = AdditionStepsTask()
