"""``Component``: per-run state with hooks the training loop calls, and one way to checkpoint it.

Providers (``tilt.wiring.providers``) and per-method state declared in a registry entry (meta
``state``, e.g. AER's coefficient controller) are components. Every hook is a no-op by default.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class Component:
    """Per-run state with optional hooks (all no-ops here)."""

    state_key: Optional[str] = None  # key of ``state_dict`` in the trainer state (None: nothing to save)

    def before_step(self, step: int) -> None:
        """Called before RL step ``step`` (1-based) samples."""

    def loss_kwargs(self) -> dict[str, Any]:
        """Per-update keyword arguments of the loss (e.g. a controlled coefficient)."""
        return {}

    def after_update(self, metrics: dict[str, float]) -> dict[str, float]:
        """Called after the step's optimizer updates with its metrics; returns metrics to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, saved in the trainer state under ``state_key``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose weights go into the checkpoint beside the policy, by name."""
        return {}

    def learner_kwargs(self) -> dict[str, Any]:
        """Keywords for ``tilt.learner.Learner`` (e.g. a trained head and its loss weight)."""
        return {}


def checkpoint_module(policy_model: torch.nn.Module, components: list[Component]) -> torch.nn.Module:
    """What the checkpoint stores as "model": the policy alone (default, unchanged format), or a
    ModuleDict {policy, <the components' modules>} when a method adds trained or frozen state."""
    extras = {k: v for c in components for k, v in c.modules().items()}
    return policy_model if not extras else torch.nn.ModuleDict({"policy": policy_model, **extras})
