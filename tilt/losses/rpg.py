"""RPG: the KL-regularised policy-gradient grid of arXiv:2505.17508 (catalogue A2).

Objective: J(theta) = E_{pi_theta}[A] - beta * D(pi_theta, pi_ref), with D one of
    fkl   KL(pi_ref || pi)            = sum pi_ref log(pi_ref / pi)
    ufkl  UKL(pi_ref || pi)           = sum pi_ref log(pi_ref / pi) + pi - pi_ref
    rkl   KL(pi || pi_ref)            = sum pi log(pi / pi_ref)
    urkl  UKL(pi || pi_ref)           = sum pi log(pi / pi_ref) - pi + pi_ref   (= E_pi[k3])
Samples come from pi_old. With w = pi/pi_old, rho = pi_ref/pi_old, u = pi/pi_ref (so w = rho u):

  fully differentiable (Table 1):   loss = -w A + beta f,   E_old[f] = D
      f_fkl = -rho log u     f_ufkl = w - rho log u - rho
      f_rkl =  w log u       f_urkl = w (log u - 1) + rho      (= w * k3, the corrected GRPO term)
  REINFORCE-style (Table 2):        loss = -sg(w A - beta g) log pi,   E_old[g grad log pi] = grad D
      g_fkl = -rho    g_ufkl = w - rho    g_rkl = w (log u + 1)    g_urkl = w log u

Both give exactly grad J in expectation (Prop. 4.1 / App. J of the paper); our tests check it by
enumeration. For a normalised policy UKL = KL, so u-variants share the fixed points of their
normalised twins: pi_ref exp(A/beta)/Z for rkl/urkl; pi = beta pi_ref / (lambda - r) for fkl/ufkl.

``level``: "token" (default) uses per-token ratios as the paper's verl code does, so D is a sum
of per-state divergences at states visited by pi_old; on multi-token problems its fixed point is
the per-state one (tilt.exact.per_state_fixed_point), NOT the sequence-level optimum.
"sequence" uses sequence ratios (sums of token log-ratios) and spreads the sequence loss
L_i over tokens as L_i m_it / len_i; it is exact for the sequence-level objective.
Names follow the reference code's ``kl_type`` (rpg_fkl ... rpg_rf_urkl).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.reduction import masked_mean

LEVELS = ("token", "sequence")


class Ratios(NamedTuple):
    """Log-ratios per token [N, T] (level "token") or per sequence [N, 1] (level "sequence")."""

    logpi: Tensor  # log pi_theta (carries grad)
    log_w: Tensor  # log pi / pi_old (carries grad)
    log_rho: Tensor  # log pi_ref / pi_old (detached)
    log_u: Tensor  # log pi / pi_ref (carries grad)
    adv: Tensor  # advantage (sequence level: masked mean over tokens)
    mask: Tensor


def log_ratios(inp: PolicyLossInput, level: str) -> Ratios:
    """The log-ratios RPG needs, at token or sequence level; padding is zeroed (no NaN leaks)."""
    if inp.ref_logp is None:
        raise ValueError("RPG losses need ref_logp")
    m = inp.mask.to(inp.logp.dtype)  # [N, T]
    zero = torch.zeros_like(inp.logp)
    logp = torch.where(m > 0, inp.logp, zero)  # [N, T]
    old = torch.where(m > 0, inp.old_logp, zero).detach()  # [N, T]
    ref = torch.where(m > 0, inp.ref_logp, zero).detach()  # [N, T]
    adv = torch.where(m > 0, inp.advantages, zero).detach()  # [N, T]
    if level == "token":
        return Ratios(logp, logp - old, ref - old, logp - ref, adv, m)
    if level == "sequence":
        length = m.sum(-1, keepdim=True)  # [N, 1]
        s = lambda x: x.sum(-1, keepdim=True)  # noqa: E731  [N, T] -> [N, 1]
        return Ratios(s(logp), s(logp - old), s(ref - old), s(logp - ref),
                      s(adv) / length.clamp(min=1.0), (length > 0).to(m.dtype))
    raise ValueError(f"unknown RPG level {level!r}; valid: {', '.join(LEVELS)}")


def to_tokens(loss: Tensor, inp: PolicyLossInput, level: str) -> Tensor:
    """Per-token loss [N, T]: token level as is; a sequence loss [N, 1] as L_i m_it / len_i."""
    m = inp.mask.to(inp.logp.dtype)  # [N, T]
    if level == "token":
        return loss * m
    return loss * m / m.sum(-1, keepdim=True).clamp(min=1.0)  # [N, T]


def _divergence_sample(kind: str, log_w: Tensor, log_rho: Tensor, log_u: Tensor) -> Tensor:
    """f with E_old[f] = D (Table 1, arXiv:2505.17508)."""
    w, rho = torch.exp(log_w), torch.exp(log_rho)
    if kind == "fkl":
        return -rho * log_u
    if kind == "ufkl":
        return w - rho * log_u - rho
    if kind == "rkl":
        return w * log_u
    if kind == "urkl":
        return w * (log_u - 1.0) + rho
    raise ValueError(kind)


def _score_coefficient(kind: str, log_w: Tensor, log_rho: Tensor, log_u: Tensor) -> Tensor:
    """g with E_old[g grad log pi] = grad D (Table 2, arXiv:2505.17508)."""
    w, rho = torch.exp(log_w), torch.exp(log_rho)
    if kind == "fkl":
        return -rho
    if kind == "ufkl":
        return w - rho
    if kind == "rkl":
        return w * (log_u + 1.0)
    if kind == "urkl":
        return w * log_u
    raise ValueError(kind)


def rpg_differentiable(inp: PolicyLossInput, *, kind: str, beta: float, level: str = "token"
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Fully differentiable RPG surrogate -w A + beta f (Table 1, arXiv:2505.17508).

    Args:
        inp: PolicyLossInput with logp, old_logp, ref_logp, advantages, mask.
        kind: "fkl" | "ufkl" | "rkl" | "urkl". beta: KL coefficient. level: "token" | "sequence".
    Returns:
        (per-token loss [N, T] for reduction "seq-mean-token-sum", metrics).
    """
    r = log_ratios(inp, level)
    f = _divergence_sample(kind, r.log_w, r.log_rho, r.log_u)  # [N, T] or [N, 1]
    loss = -torch.exp(r.log_w) * r.adv + beta * f
    metrics = {f"kl/rpg_{kind}": masked_mean(f.detach(), r.mask),
               "ratio/mean": masked_mean(r.log_w.detach().exp(), r.mask)}
    return to_tokens(loss, inp, level), metrics


def rpg_reinforce(inp: PolicyLossInput, *, kind: str, beta: float, level: str = "token",
                  clip_low: Optional[float] = None, clip_high: Optional[float] = None,
                  clip_c: float = 3.0) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE-style RPG surrogate -sg(w A - beta g) log pi (Table 2, arXiv:2505.17508).

    Args:
        kind, beta, level: as ``rpg_differentiable``.
        clip_low, clip_high, clip_c: RPG-Style Clip (the reference code's ``clip_ppo``
            kl_type): if set, drop the gradient of a sample with A > 0 and w >= 1 + clip_high,
            or A <= 0 and w outside [1 - clip_low, clip_c) (dual clip). None = no clipping.
            Our coefficient keeps the unclamped w; the reference code also clamps w inside
            the KL coefficient.
    Returns:
        (per-token loss [N, T] for reduction "seq-mean-token-sum", metrics).
    """
    r = log_ratios(inp, level)
    w, adv = torch.exp(r.log_w), r.adv
    coef = (w * adv - beta * _score_coefficient(kind, r.log_w, r.log_rho, r.log_u)).detach()
    keep = torch.ones_like(w)
    if clip_low is not None or clip_high is not None:
        lo, hi = 1.0 - (clip_low or 0.0), 1.0 + (clip_high if clip_high is not None else float("inf"))
        keep_pos = (w < hi).to(w.dtype)
        keep_neg = ((w >= lo) & (w < clip_c)).to(w.dtype)
        keep = torch.where(adv > 0, keep_pos, keep_neg).detach()
    loss = -keep * coef * r.logpi
    metrics = {"clip/frac": masked_mean(1.0 - keep, r.mask), "ratio/mean": masked_mean(w.detach(), r.mask)}
    return to_tokens(loss, inp, level), metrics


def _register(kind: str) -> None:
    meta = dict(reduction="seq-mean-token-sum", needs=("ref_logp",))

    def differentiable(inp: PolicyLossInput, *, beta: float = 1e-4, level: str = "token"):
        return rpg_differentiable(inp, kind=kind, beta=beta, level=level)

    def reinforce(inp: PolicyLossInput, *, beta: float = 1e-4, level: str = "token",
                  clip_low: Optional[float] = None, clip_high: Optional[float] = None, clip_c: float = 3.0):
        return rpg_reinforce(inp, kind=kind, beta=beta, level=level,
                             clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)

    differentiable.__name__, reinforce.__name__ = f"rpg_{kind}", f"rpg_rf_{kind}"
    differentiable.__doc__ = f"RPG fully differentiable surrogate, D = {kind} (Table 1, arXiv:2505.17508)."
    reinforce.__doc__ = f"RPG REINFORCE-style surrogate, D = {kind} (Table 2, arXiv:2505.17508)."
    LOSSES.register(f"rpg_{kind}", **meta)(differentiable)
    LOSSES.register(f"rpg_rf_{kind}", **meta)(reinforce)


for _kind in ("fkl", "ufkl", "rkl", "urkl"):
    _register(_kind)
