"""KL estimators (catalogue A1) and their placement: in the loss or in the reward.

Every estimator is ``fn(logp [N, T], ref_logp [N, T], *, logits=None, ref_logits=None)
-> [N, T]``, evaluated on tokens y_t sampled from pi (log r = log pi - log pi_ref):

    k1 = log r                      unbiased for KL(pi || pi_ref)
    k2 = 0.5 (log r)^2              E_pi[k2] = KL + E_pi[0.5 (log r)^2 - log r]; not KL
    k3 = rho - 1 - log rho,         rho = pi_ref / pi; unbiased, >= 0
    low_var_kl = k3 with log rho clamped to [-20, 20] and the result to [-10, 10] (verl)
    full = sum_v pi(v) log pi(v)/pi_ref(v) from the full logits [N, T, V] (exact, no sampling)

Source: J. Schulman, "Approximating KL divergence" (2020); k1/k2/k3 as named in Sec. 2 of
arXiv:2505.17508 (RPG); low_var_kl as in verl ``verl/trainer/ppo/core_algos.py::kl_penalty``.
The Tsallis estimator (catalogue A3) lives in tilt.losses.regularizers and registers here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tilt.registry import Registry

KL_ESTIMATORS: Registry = Registry("kl estimator")


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
       ref_logits: Optional[Tensor] = None) -> Tensor:
    """k1 = log pi(y) - log pi_ref(y), [N, T]."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
       ref_logits: Optional[Tensor] = None) -> Tensor:
    """k2 = 0.5 (log pi(y) - log pi_ref(y))^2, [N, T]."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
       ref_logits: Optional[Tensor] = None) -> Tensor:
    """k3 = rho - 1 - log rho with rho = pi_ref(y) / pi(y), [N, T]."""
    log_rho = ref_logp - logp  # [N, T]
    return torch.exp(log_rho) - 1.0 - log_rho


@KL_ESTIMATORS.register("low_var_kl")
def low_var_kl(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
               ref_logits: Optional[Tensor] = None) -> Tensor:
    """k3 with log rho clamped to [-20, 20] and the value to [-10, 10] (verl kl_penalty)."""
    log_rho = (ref_logp - logp).clamp(-20.0, 20.0)  # [N, T]
    return (torch.exp(log_rho) - 1.0 - log_rho).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("full")
def full(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
         ref_logits: Optional[Tensor] = None) -> Tensor:
    """Exact KL(pi(.|s_t) || pi_ref(.|s_t)) per position from logits [N, T, V] -> [N, T]."""
    if logits is None or ref_logits is None:
        raise ValueError("the 'full' KL estimator needs logits and ref_logits [N, T, V]")
    return categorical_kl(logits, ref_logits)


def categorical_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the last dim, [..., V] -> [...]."""
    logq = torch.log_softmax(logits, dim=-1)  # [..., V]
    logq_ref = torch.log_softmax(ref_logits, dim=-1)  # [..., V]
    return (logq.exp() * (logq - logq_ref)).sum(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k3", beta: float,
               placement: str = "loss", logits: Optional[Tensor] = None,
               ref_logits: Optional[Tensor] = None, **hypers) -> Tensor:
    """Per-token KL term, placed in the loss or in the reward.

    Args:
        logp, ref_logp: [N, T] log-probabilities of the sampled tokens under pi and pi_ref.
        estimator: a KL_ESTIMATORS name. beta: coefficient.
        placement: "loss" -> +beta * kl per token, differentiable, to add to a per-token
            loss (GRPO style, Eq. 3 of arXiv:2402.03300); "reward" -> -beta * kl per token,
            detached, to add to the per-token rewards before computing advantages (PPO/RLHF
            style, arXiv:2203.02155 Eq. 2).
        logits, ref_logits: [N, T, V], for the "full" estimator. ``hypers`` go to the estimator.
    Returns:
        [N, T] tensor.
    """
    kl = KL_ESTIMATORS.get(estimator)(logp, ref_logp, logits=logits, ref_logits=ref_logits, **hypers)
    if placement == "loss":
        return beta * kl
    if placement == "reward":
        return -beta * kl.detach()
    raise ValueError(f"unknown KL placement {placement!r}; valid: 'loss', 'reward'")
