"""KL estimators (catalogue A1) and their placement: in the loss or in the reward.

Every estimator is ``fn(logp [N, T], ref_logp [N, T], *, logits=None, ref_logits=None)
-> [N, T]``, evaluated on tokens y_t sampled from pi (log r = log pi - log pi_ref):

    k1 = log r                      unbiased for KL(pi || pi_ref)
    k2 = 0.5 (log r)^2              E_pi[k2] = KL + E_pi[0.5 (log r)^2 - log r]; not KL
    k3 = rho - 1 - log rho,         rho = pi_ref / pi; unbiased, >= 0
    low_var_kl = k3 with log rho clamped to [-20, 20] and the result to [-10, 10] (verl)
    full = sum_v pi(v) log pi(v)/pi_ref(v) from the full logits [N, T, V] (exact, no sampling)

Source: J. Schulman, "Approximating KL divergence" (2020); k1/k2/k3 as named in
arXiv:2505.17508 (RPG); low_var_kl as in verl ``verl/trainer/ppo/core_algos.py::kl_penalty``.
Also registered here: ``tsallis`` (catalogue A3, q-logarithm KL), ``critical`` (catalogue A7,
KL down-weighted on tokens where the reference is uncertain) and ``k3_is`` (TRL's
``use_bias_correction_kl``: k3 times the importance ratio pi/pi_old, reverse-KL gradient).
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


@KL_ESTIMATORS.register("full", needs=("logits", "ref_logits"))
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


def q_log(log_x: Tensor, q: float) -> Tensor:
    """q-logarithm ln_q(x) = (x^(1-q) - 1) / (1 - q) from log x; ln_1 = log (Tsallis 1988;
    the convention of arXiv:2301.11476 and its code ``logq_x``)."""
    if q == 1.0:
        return log_x
    return torch.expm1((1.0 - q) * log_x) / (1.0 - q)


@KL_ESTIMATORS.register("tsallis")
def tsallis(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
            ref_logits: Optional[Tensor] = None, q: float = 2.0) -> Tensor:
    """-ln_q(pi_ref/pi) at the sampled token, [N, T]: unbiased for the Tsallis KL
    D_q(pi || pi_ref) = E_pi[-ln_q(pi_ref / pi)] (arXiv:2301.11476); q = 1 gives k1."""
    return -q_log(ref_logp - logp, q)


def tsallis_kl(logits: Tensor, ref_logits: Tensor, *, q: float) -> Tensor:
    """Exact D_q(softmax(logits) || softmax(ref_logits)) over the last dim, [..., V] -> [...]."""
    logq = torch.log_softmax(logits, dim=-1)  # [..., V]
    logq_ref = torch.log_softmax(ref_logits, dim=-1)  # [..., V]
    return (logq.exp() * -q_log(logq_ref - logq, q)).sum(-1)


def reference_certainty(ref_logits: Tensor, *, kind: str = "max_prob") -> Tensor:
    """How sure pi_ref is at each position, in [0, 1], [N, T, V] -> [N, T] (arXiv:2502.06533 and its code).

    "max_prob": max_v pi_ref(v); "negentropy_max_prob": 1 + log max_v pi_ref(v) / log V
    (both as in the paper's code); "negentropy": 1 - H(pi_ref) / log V (our addition).
    """
    logp_ref = torch.log_softmax(ref_logits, dim=-1)  # [N, T, V]
    log_v = torch.log(torch.tensor(float(ref_logits.shape[-1]), dtype=ref_logits.dtype))
    if kind == "max_prob":
        return logp_ref.max(-1).values.exp()
    if kind == "negentropy_max_prob":
        return 1.0 + logp_ref.max(-1).values / log_v
    if kind == "negentropy":
        return 1.0 + (logp_ref.exp() * logp_ref).sum(-1) / log_v
    raise ValueError(f"unknown certainty {kind!r}; valid: max_prob, negentropy_max_prob, negentropy")


@KL_ESTIMATORS.register(
    "critical", needs=lambda kw: ("ref_logits",) + tuple(KL_ESTIMATORS.entry(kw.get("base", "k3")).needs(kw)))
def critical(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
             ref_logits: Optional[Tensor] = None, base: str = "k3", certainty: str = "max_prob",
             exponent: float = 1.0, intercept: float = 0.0) -> Tensor:
    """Prioritised KL: weight(c(s)) * k(s, y), c = certainty of pi_ref at s (arXiv:2502.06533).

    weight = (1 - intercept) * certainty^exponent + intercept (intercept <= 0, weight(1) = 1),
    so the penalty fades on tokens where pi_ref is unsure ("critical tokens") and the policy
    may explore there. ``base`` is the per-token estimator (k1, k2, k3, ...). [N, T].
    Which base: in the REWARD (kl.placement=reward) only ``base="k1"`` reaches the certainty-scaled
    target softmax(log pi_ref + r / (beta w)) (tests/test_regularizers.py); with the default k3
    there the same run ends 0.66 in TV from it (k3's value is not a score-function KL reward). In the LOSS k1 has zero expected gradient and k3 the forward-KL
    gradient (scaled by w), so the default k3 suits the default placement, but does not reach the
    reverse-KL target either.
    """
    if ref_logits is None:
        raise ValueError("the 'critical' KL estimator needs ref_logits [N, T, V]")
    if intercept > 0:
        raise ValueError(f"intercept must be <= 0, got {intercept}")
    c = reference_certainty(ref_logits.detach(), kind=certainty)  # [N, T]
    weight = (1.0 - intercept) * c ** exponent + intercept  # [N, T]
    kl = KL_ESTIMATORS.get(base)(logp, ref_logp, logits=logits, ref_logits=ref_logits)  # [N, T]
    return weight * kl


@KL_ESTIMATORS.register("k3_is", needs=("old_logp", "mask"))
def k3_is(logp: Tensor, ref_logp: Tensor, *, logits: Optional[Tensor] = None,
          ref_logits: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
          mask: Optional[Tensor] = None, level: str = "token") -> Tensor:
    """k3 weighted by the importance ratio pi/pi_old (differentiable): TRL's ``use_bias_correction_kl``.

    k3_is = (pi(y) / pi_old(y)) * k3, [N, T] (DeepSeek-V3.2 arXiv:2512.02556, "unbiased KL
    estimate"; TRL 1.16 grpo_trainer.py L3096-L3104, where it is the default). Samples come
    from pi_old, so E_pi_old[r k3] = E_pi[k3] = KL(pi || pi_ref) even off-policy, and its
    gradient is that of the REVERSE KL: on-policy grad(r k3) = (log pi - log pi_ref) grad log pi,
    so ``grpo`` + beta k3_is in the loss reaches pi* prop. to pi_ref exp(r/beta), while plain
    k3 in the loss reaches the forward-KL optimum (tests/test_losses_policy.py).
    Args:
        old_logp: [N, T] log pi_old of the sampled tokens (the learner supplies it: registry
            ``needs``); None means on-policy, ratio exp(logp - sg[logp]) = 1 in value.
        mask: [N, T] completion mask, used by ``level="sequence"``.
        level: "token" (per-token ratio) or "sequence" (GSPO's exp(mean_t log ratio), as TRL
            with ``importance_sampling_level="sequence"``).
    """
    from tilt.losses.policy import log_importance_ratio

    old = logp.detach() if old_logp is None else old_logp
    m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    log_ratio = log_importance_ratio(logp, old, m, level=level)  # [N, T]
    return torch.exp(log_ratio) * k3(logp, ref_logp)


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
