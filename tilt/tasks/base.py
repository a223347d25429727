"""The task interface: seeded, procedurally generated, verifiable problems.

A task turns (seed, difficulty) into an ``Item`` deterministically and scores a completion
with a verifier returning a reward in [0, 1]. Seeds come from disjoint ranges per split, so
a run can say exactly which items it trained on and which it evaluated on (catalogue G3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

# Disjoint generator-seed ranges, half-open [start, stop). The labelled SFT set that built the
# shipped base model, the RL training prompts and the held-out evaluation never share a seed.
SEED_RANGES: dict[str, tuple[int, int]] = {
    "sft": (0, 1_000_000),
    "train": (1_000_000, 1_000_000_000),
    "eval": (1_000_000_000, 2_000_000_000),
}


@dataclass(frozen=True)
class Item:
    """One problem instance. ``columns`` are what the verifier (reward function) reads."""

    task: str
    difficulty: int
    seed: int
    prompt: str  # text the model continues, e.g. "47+85="
    answer: str  # one reference solution, e.g. "132" (used for SFT and display only)
    columns: dict[str, Any] = field(default_factory=dict)  # verifier inputs, JSON-serialisable
    raw_prompt: Any = None  # a dataset's prompt as stored (string or messages); None = ``prompt``
    fields: Optional[dict[str, Any]] = None  # a dataset row minus its prompt; None = a procedural item

    @property
    def prompt_value(self) -> Any:
        """The prompt as reward functions receive it: the string, or the list of messages."""
        return self.prompt if self.raw_prompt is None else self.raw_prompt

    def reward_columns(self) -> dict[str, Any]:
        """The row's columns as TRL passes them to reward functions (everything but the prompt).

        A procedural item's row is {task, difficulty, answer, columns}: the built-in verifier
        reads ``task`` and the ``columns`` dict; a dataset row's are its own columns."""
        if self.fields is not None:
            return self.fields
        return {"task": self.task, "difficulty": self.difficulty, "answer": self.answer, "columns": self.columns}


class Task(Protocol):
    """A procedurally generated, verifiable task."""

    name: str
    difficulties: tuple[int, ...]

    def generate(self, seed: int, difficulty: int) -> Item:
        """Deterministic: the same (seed, difficulty) always gives the same Item."""
        ...

    def verify(self, completion: str, **columns: Any) -> float:
        """Reward in [0, 1] for ``completion`` (the text after the prompt, EOS stripped)."""
        ...
