"""Process rewards per reasoning step (PURE's inputs) from a step-wise task.

Shapes: N = B*G rows (group-major), S steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.config import Config, ConfigError
from tilt.providers import Provider, StepData, provides
from tilt.tasks import TASKS, get_task
from tilt.wiring.sampling import Scored


def char_to_token(tokenizer, token_ids: list[int], eos_id: int) -> list[int]:
    """End (exclusive) character offset of each token in the decoded completion (EOS decodes to "")."""
    ends, total = [], 0
    for t in token_ids:
        total += 0 if t == eos_id else len(tokenizer.decode([t], skip_special_tokens=True))
        ends.append(total)
    return ends


def process_steps(policy, sc: Scored) -> dict[str, Tensor]:
    """PURE's inputs: per-step rewards [N, S] (NaN-padded) and the token closing each step [N, S] (-1-padded).

    A task with ``step_rewards`` / ``step_char_ends`` (tilt.tasks.addition_steps) gives one
    reward per step and the step's last character, mapped here to the token holding it. A row
    of any other task, or a dataset row, is one step: its outcome reward, closed at its last token.
    """
    rows: list[tuple[list[float], list[int]]] = []
    for i, text in enumerate(sc.texts):
        m = sc.rb.completion_mask[i].bool()
        ids = sc.rb.completion_ids[i][m].tolist()
        last = len(ids) - 1
        name = sc.columns["task"][i] if "task" in sc.columns else None  # dataset rows have no task
        task = get_task(name) if name in TASKS else None
        if not hasattr(task, "step_rewards"):
            rows.append(([float(sc.rewards[i])], [last]))
            continue
        ends = char_to_token(policy.tokenizer, ids, policy.eos_id)
        cols = sc.columns["columns"][i]
        tok = [next((k for k, e in enumerate(ends) if e > c), last) for c in task.step_char_ends(text, **cols)]
        rows.append(([float(x) for x in task.step_rewards(text, **cols)], tok))
    S = max(len(r) for r, _ in rows)
    step_rewards = torch.full((len(rows), S), float("nan"))  # [N, S]
    step_ends = torch.full((len(rows), S), -1, dtype=torch.long)  # [N, S]
    for i, (r, e) in enumerate(rows):
        step_rewards[i, :len(r)] = torch.tensor(r)
        step_ends[i, :len(e)] = torch.tensor(e, dtype=torch.long)
    return {"step_rewards": step_rewards, "step_ends": step_ends}


@provides("step_rewards")
class ProcessSteps(Provider):
    """Per-step process rewards [N, S] and the token closing each step [N, S] from a step-wise task
    (``step_rewards`` / ``step_char_ends``, tilt.tasks.addition_steps); other rows are one step."""

    @classmethod
    def check(cls, cfg: Config, names: frozenset[str], who: str) -> None:
        from tilt.tasks.mix import parse_mix

        tasks = {task for task, _, _ in parse_mix(cfg.tasks.mix)}
        if not any(hasattr(get_task(t), "step_rewards") and hasattr(get_task(t), "step_char_ends") for t in tasks):
            raise ConfigError(f"{who} needs per-step process rewards, but the task mix {cfg.tasks.mix!r} has no "
                              f"step-wise task; add one, e.g. tasks.mix=addition_steps:1-2")

    def advantage(self, data: StepData) -> dict[str, Tensor]:
        return process_steps(self.run.policy, data.scored)
