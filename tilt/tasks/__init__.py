"""Task registry: one instance per procedurally generated, verifiable task (catalogue G3).

A task is chosen by name (``get_task("countdown")``); an unknown name lists the valid ones.
Mixes of tasks and the seeded train / eval item streams live in ``tilt.tasks.mix``.
"""
from __future__ import annotations

from tilt.registry import Registry
from tilt.tasks.arithmetic import ADDITION, MULTIPLICATION
from tilt.tasks.base import SEED_RANGES, Item, Task
from tilt.tasks.countdown import COUNTDOWN
from tilt.tasks.sorting import SORTING
from tilt.tasks.addition_steps import ADDITION_STEPS

TASKS: Registry = Registry("task")

from tilt.verifiers.tasks import ECOSYSTEM_TASKS  # noqa: E402 - rg_chain_sum, code_mul (lazy: no heavy import)

for _task in (ADDITION, MULTIPLICATION, COUNTDOWN, SORTING, ADDITION_STEPS, *ECOSYSTEM_TASKS):
    TASKS.register(_task.name, difficulties=_task.difficulties)(_task)


def get_task(name: str) -> Task:
    """The registered task called ``name``; raises UnknownNameError listing valid names."""
    return TASKS.get(name)


__all__ = ["SEED_RANGES", "TASKS", "Item", "Task", "get_task"]
