"""State some methods carry across RL steps, kept in the trainer state and the checkpoint.

* HAEPO (catalogue B4): a frozen copy pi_prev of the policy, refreshed every N RL steps; its
  weights go into the checkpoint (``checkpoint_module``) so a resumed run sees the same pi_prev.
* AER (catalogue A5): the global entropy coefficient alpha and the anchor entropy H_0, updated
  after every RL step by ``aer_update``; stored in the JSON trainer state.
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Optional

import torch

from tilt.losses.regularizers import AERState, aer_update


class PrevPolicy:
    """HAEPO's pi_prev: a frozen copy of the policy, refreshed before RL steps 1, 1+N, 1+2N, ..."""

    def __init__(self, policy_model: torch.nn.Module, *, every: int):
        self.model = copy.deepcopy(policy_model).eval().requires_grad_(False)
        self.every = every

    def before_step(self, policy_model: torch.nn.Module, step: int) -> None:
        if (step - 1) % self.every == 0:
            self.model.load_state_dict(policy_model.state_dict())


class AERController:
    """AER's global coefficient controller (component iii, arXiv:2510.10959) around ``aer_update``."""

    def __init__(self, *, alpha: float, tau: float, lr: float, alpha_max: float):
        self.alpha0, self.tau, self.lr, self.alpha_max = alpha, tau, lr, alpha_max

    def init_state(self, state: dict[str, Any]) -> None:
        state.setdefault("aer", asdict(AERState(alpha=self.alpha0)))

    def loss_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"alpha": state["aer"]["alpha"]}

    def after_update(self, state: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
        new = aer_update(AERState(**state["aer"]), metrics["entropy"], tau=self.tau, lr=self.lr,
                         alpha_max=self.alpha_max)
        state["aer"] = asdict(new)
        return {"aer/alpha": new.alpha, "aer/target_entropy": self.tau * new.initial_entropy}


class LoopHooks:
    """The per-step hooks of the configured method; every call is a no-op on the default path."""

    def __init__(self, policy_model: Optional[torch.nn.Module] = None, *, prev: Optional[PrevPolicy] = None,
                 aer: Optional[AERController] = None):
        self.policy_model, self.prev, self.aer = policy_model, prev, aer

    def init_state(self, state: dict[str, Any]) -> None:
        if self.aer is not None:
            self.aer.init_state(state)

    def before_step(self, step: int) -> None:
        if self.prev is not None:
            self.prev.before_step(self.policy_model, step)

    def loss_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.aer.loss_kwargs(state) if self.aer is not None else {}

    def after_update(self, state: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
        return self.aer.after_update(state, metrics) if self.aer is not None else {}


def checkpoint_module(policy_model: torch.nn.Module, *, value_head: Optional[torch.nn.Module] = None,
                      prev_model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """What the checkpoint stores as "model": the policy alone (default, unchanged format), or a
    ModuleDict {policy, value_head, prev_policy} when a method adds trained or frozen state."""
    extras = {k: v for k, v in (("value_head", value_head), ("prev_policy", prev_model)) if v is not None}
    return policy_model if not extras else torch.nn.ModuleDict({"policy": policy_model, **extras})
