"""A method added from outside tilt (the worked example of docs/adding_a_method.md).

``teacher_anchored_pg``: PPO-clip plus c * KL(pi_teacher || pi_theta) per token, with the
coefficient c kept near a target KL by the adaptive controller of Ziegler et al. (2019),
arXiv:1909.08593 Sec. 2.2: e_t = clip(KL_t / KL_target - 1, -0.2, 0.2), c <- c (1 + K e_t).

It reads the teacher's logits (a need tilt's "teacher_logits" provider supplies once
``teacher.path`` is set) and keeps per-run state (the controller), which tilt checkpoints and
restores through the ``Component`` interface. Nothing in tilt is edited to add it: a config names
this file in ``plugins``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.reduction import masked_mean
from tilt.state import Component


class AdaptiveCoef(Component):
    """Ziegler et al.'s proportional controller of the KL coefficient (Sec. 2.2, arXiv:1909.08593).

    Settings (in loss.kwargs): coef (start value, shared with the loss), target_kl, gain (K).
    """

    state_key = "teacher_anchored"

    def __init__(self, *, coef: float = 0.1, target_kl: float = 0.5, gain: float = 0.1):
        if target_kl <= 0 or gain < 0:
            raise ValueError(f"target_kl must be > 0 and gain >= 0, got {target_kl}, {gain}")
        self.coef, self.target, self.gain = coef, target_kl, gain

    def loss_kwargs(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def after_update(self, metrics: dict[str, float]) -> dict[str, float]:
        error = min(max(metrics["teacher/kl"] / self.target - 1.0, -0.2), 0.2)
        self.coef = self.coef * (1.0 + self.gain * error)
        return {"teacher/coef": self.coef}

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = state["coef"]


@LOSSES.register("teacher_anchored_pg", reduction="token-mean", needs=("logits", "teacher_logits"),
                 state=AdaptiveCoef)
def teacher_anchored_pg(inp: PolicyLossInput, *, coef: float = 0.1, eps: float = 0.2
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """max(-r A, -clip(r, 1 - eps, 1 + eps) A) + coef * sum_v p_T(v) (log p_T(v) - log pi(v)), [N, T]."""
    ratio = torch.exp(inp.logp - inp.old_logp.detach())  # [N, T]
    adv = inp.advantages.detach()
    pg = torch.maximum(-ratio * adv, -ratio.clamp(1 - eps, 1 + eps) * adv)  # [N, T]
    log_t = torch.log_softmax(inp.teacher_logits.detach(), -1)  # [N, T, V]
    log_p = torch.log_softmax(inp.logits, -1)  # [N, T, V]
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)  # [N, T] forward KL teacher -> policy
    return pg + coef * kl, {"teacher/kl": masked_mean(kl.detach(), inp.mask)}


@LOSSES.register("needs_an_unknown_input", reduction="token-mean", needs=("gold_logits",))
def needs_an_unknown_input(inp: PolicyLossInput) -> tuple[Tensor, dict[str, Tensor]]:
    """A loss whose input no provider supplies: building a run with it must fail clearly."""
    return -inp.logp, {}
