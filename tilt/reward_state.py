"""What a reward function gets as ``trainer_state`` (TRL's keyword), in a module that imports nothing
heavy: reward calls run in worker processes (``tilt.reward_pool``), which unpickle it."""
from __future__ import annotations


class RewardState:
    """What ``trainer_state`` holds for a reward function (as transformers.TrainerState): the
    current ``global_step`` and ``max_steps``. ``log_metric(name, value)`` calls are gathered in
    ``logged`` and reach metrics.jsonl as ``reward_fn/<name>`` (mean over the step's calls)."""

    def __init__(self, max_steps: int = 0):
        self.global_step, self.max_steps, self.epoch = 0, max_steps, 0.0
        self.logged: dict[str, list[float]] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.logged.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:  # completions table: not kept by tilt
        return None

    def pop_logged(self) -> dict[str, float]:
        out = {f"reward_fn/{k}": sum(v) / len(v) for k, v in self.logged.items() if v}
        self.logged = {}
        return out
