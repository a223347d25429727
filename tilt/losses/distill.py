"""Reverse-KL distillation from a teacher, alone or jointly with the RL loss (catalogue B10).

    reverse_kl_distill   per-token KL(pi_theta || pi_teacher) from full logits (MiniLLM's
                         objective, arXiv:2306.08543, evaluated exactly at each position)
    kdrl                 GRPO surrogate + kd_coef * the same reverse KL (arXiv:2506.02208)

The teacher's logits arrive in ``PolicyLossInput.teacher_logits`` [N, T, V] (detached); the
student's in ``logits`` [N, T, V] (with grad). With full logits the per-position KL is exact,
so no k2/k3 sampling estimator is needed (KDRL Sec. 3 compares such estimators).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.losses.policy import Metrics, clipped_pg, masked
from tilt.reduction import masked_mean


def reverse_kl(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(teacher_logits)) = sum_v p(v) (log p(v) - log q(v)). [..., V] -> [...]."""
    logp = torch.log_softmax(logits, dim=-1)  # [..., V]
    logq = torch.log_softmax(teacher_logits.detach().to(logp.dtype), dim=-1)  # [..., V]
    return (logp.exp() * (logp - logq)).sum(-1)


def _teacher_kl(inp: PolicyLossInput) -> Tensor:
    if inp.logits is None or inp.teacher_logits is None:
        raise ValueError("distillation losses need PolicyLossInput.logits and teacher_logits [N, T, V]")
    mask = inp.mask
    safe = mask[..., None] > 0  # [N, T, 1]
    logits = torch.where(safe, inp.logits, torch.zeros_like(inp.logits))  # [N, T, V]
    teacher = torch.where(safe, inp.teacher_logits, torch.zeros_like(inp.teacher_logits))  # [N, T, V]
    return masked(reverse_kl(logits, teacher), mask)  # [N, T]


@LOSSES.register("reverse_kl_distill", reduction="token-mean", needs=("logits", "teacher_logits"))
def reverse_kl_distill(inp: PolicyLossInput) -> tuple[Tensor, Metrics]:
    """Reverse-KL distillation: KL(pi_theta(.|s_t) || pi_T(.|s_t)) at every completion position.

    MiniLLM (Sec. 2, arXiv:2306.08543) minimises the sequence-level KL(pi_theta || pi_T) on the
    student's own samples; this is its per-position term, exact from the full logits. Summed
    along a sampled trajectory it is an estimate of the sequence-level reverse KL whose gradient
    omits the score-function term through the visited states (the myopic part only).
    """
    kl = _teacher_kl(inp)  # [N, T]
    return kl, {"kd/reverse_kl": masked_mean(kl, inp.mask).detach()}


@LOSSES.register("kdrl", reduction="seq-mean-token-mean", needs=("logits", "teacher_logits"))
def kdrl(inp: PolicyLossInput, *, kd_coef: float = 0.1, eps_low: float = 0.2,
         eps_high: float = 0.2) -> tuple[Tensor, Metrics]:
    """KDRL: GRPO surrogate + kd_coef * KL(pi_theta || pi_T) per token (unified objective, Sec. 3, arXiv:2506.02208).

    On a one-step problem (bandit) the fixed point is pi_T exp(r / kd_coef) / Z: the tilted
    optimum with the teacher in place of pi_ref. kd_coef = 0.1 is our default, not the paper's.
    """
    pg, metrics = clipped_pg(inp, eps_low=eps_low, eps_high=eps_high)  # [N, T]
    kl = _teacher_kl(inp)  # [N, T]
    metrics["kd/reverse_kl"] = masked_mean(kl, inp.mask).detach()
    return masked(pg + kd_coef * kl, inp.mask), metrics
