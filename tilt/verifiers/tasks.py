"""Ecosystem tasks for task mixes: a reasoning-gym generator and a code_exec task.

Both follow ``tilt.tasks.base.Task``: ``generate(seed, difficulty)`` with seeds from the disjoint
``SEED_RANGES`` of each split, and ``verify(completion, **columns)``. Nothing is imported at module
level (``tilt.tasks`` registers these, so importing it here would be circular); reasoning-gym and
the sandbox load on first use, so registering these tasks costs nothing at import.

- ``rg_chain_sum``: reasoning-gym's ``chain_sum`` (difficulty 1: two one-digit terms; 2: two
  two-digit terms; "+" or "-"), the question's problem compacted to the shipped model's prompt
  format ("8-0="), scored by ``chain_sum``'s own ``score_answer``.
- ``code_mul``: the multiplication prompts ("47*8="), the completion executed as the program
  ``print(<completion>)`` in the ``code_exec`` sandbox and checked against the product on stdout.
  It runs the whole sandboxed path with a model that can only write numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable



@dataclass
class ReasoningGymTask:
    """A reasoning-gym generator as a tilt Task: item seed = tilt's split seed (``Random(seed)``).

    ``levels`` maps a difficulty to the generator kwargs added to ``kwargs``; ``prompt_fn`` maps the
    question to the prompt (e.g. ``str.lower`` for the shipped character-level model).
    """

    generator: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    levels: dict[int, dict[str, Any]] = field(default_factory=lambda: {1: {}})
    prompt_fn: Callable[[str], str] = lambda q: q
    check: bool = True  # build one item now so a bad name / kwargs fails at construction

    def __post_init__(self) -> None:
        self.name = f"rg_{self.generator}"
        self.difficulties = tuple(sorted(self.levels))
        if self.check:
            for d in self.difficulties:
                self.generate(0, d)

    def generate(self, seed: int, difficulty: int):
        from tilt.tasks.arithmetic import check_item_args
        from tilt.tasks.base import Item
        from tilt.verifiers.reasoning_gym_source import make_dataset

        seed, difficulty = check_item_args(self, seed, difficulty)
        kw = {**self.kwargs, **self.levels[difficulty]}
        e = make_dataset(self.generator, seed=seed, size=1, kwargs=kw)[0]
        meta = {**e["metadata"], "rg_generator": self.generator, "rg_kwargs": kw, "rg_item_seed": seed}
        return Item(self.name, difficulty, seed, self.prompt_fn(e["question"]), str(e["answer"]),
                    {"answer": str(e["answer"]), "metadata": _jsonable(meta)})

    def verify(self, completion: str, *, answer: str, metadata: dict[str, Any], **_: Any) -> float:
        from tilt.verifiers.reasoning_gym_source import score_entry

        return score_entry(completion, answer, metadata)


def _jsonable(x: Any) -> Any:
    """Tuples -> lists, so Item.columns stay JSON-serialisable (reasoning-gym metadata has tuples)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclass(frozen=True)
class CodeMulTask:
    """Multiplication prompts; the completion runs as ``print(<completion>)`` in the sandbox."""

    name: str = "code_mul"
    difficulties: tuple[int, ...] = (1, 2, 3)  # those of tilt.tasks.arithmetic.MULTIPLICATION (tested)

    def generate(self, seed: int, difficulty: int):
        from tilt.tasks.arithmetic import MULTIPLICATION
        from tilt.tasks.base import Item

        it = MULTIPLICATION.generate(seed, difficulty)
        cols = {"tests": [{"input": "", "output": it.answer}], "code_prefix": "print(", "code_suffix": ")"}
        return Item(self.name, it.difficulty, it.seed, it.prompt, it.answer, cols)

    def verify(self, completion: str, **columns: Any) -> float:
        from tilt.rewards import resolve_reward_fn

        return resolve_reward_fn("code_exec")([""], [completion], columns=[columns])[0]


def compact_arithmetic(question: str) -> str:
    """"State the final answer ...: 8 - 0 =" -> "8-0=": the problem in the shipped model's own format."""
    return question.rpartition(":")[2].replace(" ", "")


RG_CHAIN_SUM = ReasoningGymTask("chain_sum", {"min_terms": 2, "max_terms": 2},
                                levels={1: {"min_digits": 1, "max_digits": 1}, 2: {"min_digits": 2, "max_digits": 2}},
                                prompt_fn=compact_arithmetic, check=False)
CODE_MUL = CodeMulTask()
ECOSYSTEM_TASKS = (RG_CHAIN_SUM, CODE_MUL)

__all__ = ["CODE_MUL", "ECOSYSTEM_TASKS", "RG_CHAIN_SUM", "CodeMulTask", "ReasoningGymTask"]
