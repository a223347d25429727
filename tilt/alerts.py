"""What a user needs to hear during a run: no learning signal, and progress of a long evaluation."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch


def throttled(echo: Callable[[str], None], every_s: float = 10.0) -> Callable[[str], None]:
    """``echo`` at most once per ``every_s`` seconds (progress lines of a long evaluation)."""
    last = [time.time()]

    def f(line: str) -> None:
        if time.time() - last[0] >= every_s:
            last[0] = time.time()
            echo(line)

    return f


class SignalWatch:
    """Counts consecutive steps whose advantages are all zero; warns once when ``steps`` is reached."""

    def __init__(self, steps: int):
        self.steps, self.streak = steps, 0

    def update(self, advantages: torch.Tensor, metrics: dict[str, float]) -> Optional[str]:
        self.streak = self.streak + 1 if not bool(advantages.abs().gt(0).any()) else 0
        if not self.steps or self.streak != self.steps:
            return None
        return (f"warning: no learning signal for {self.steps} steps: every group's advantages were zero "
                f"(reward/mean {metrics.get('reward/mean', float('nan')):.3f}, reward/errors "
                f"{metrics.get('reward/errors', 0):.0f}). Likely causes: the reward is always 0 or always 1 "
                "for every completion of a prompt (task too hard or too easy for the model, a reward that "
                "reads the wrong column), or the reward function is failing (see reward/errors).")
