"""TRL 1.16's remaining ``loss_type`` values (catalogue B11): bnpo, cispo, sapo, luspo, vespo.

Each takes TRL's name, TRL's hyper-parameters (by TRL's name where one exists, e.g.
``sapo_temperature_pos`` -> ``tau_pos``) and TRL's reduction, so a ``GRPOConfig`` ported by name
(``tilt.trl_compat``) gives TRL's loss; tests/test_trl_parity.py checks value and gradient
against TRL's own ``GRPOTrainer._compute_loss``. TRL references are to trl 1.16,
trl/trainer/grpo_trainer.py ``_compute_loss`` (L3020-L3185) and ``get_gamma_weights``
(L2972-L3018). ``level`` is TRL's ``importance_sampling_level`` (see
``tilt.losses.policy.log_importance_ratio``).

Reductions: TRL normalises "bnpo" by the local micro-batch's token count; tilt's ``token-mean``
divides by the token count of the whole mini-batch (equal with one micro-batch per step, and
the same gradient as TRL's "dapo" normaliser in every case).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.losses.policy import Metrics, clipped_pg, log_importance_ratio, masked, seq_sum
from tilt.reduction import masked_mean


@LOSSES.register("bnpo", reduction="token-mean", needs=())
def bnpo(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2, level: str = "token",
         delta: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """BNPO as TRL 1.16 ``loss_type="bnpo"``: the GRPO clipped surrogate, token-mean over the batch.

    TRL L3158-L3162 ("normalizing with the number of active tokens in the local batch").
    The BNPO paper (arXiv:2506.02864) also adapts the advantage's normalisation with a Beta
    distribution; TRL's name covers only this reduction, and so does ours.
    """
    return clipped_pg(inp, eps_low=eps_low, eps_high=eps_high, level=level, delta=delta)


@LOSSES.register("luspo", reduction="seq-mean-token-sum", needs=())
def luspo(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2, level: str = "sequence",
          delta: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """LUSPO (arXiv:2602.05261) as TRL 1.16 ``loss_type="luspo"``: GSPO's sequence-ratio clipped
    surrogate summed over tokens, i.e. each sequence's loss scaled by its length, then the mean
    over sequences (TRL L3179-L3186). TRL's default level is "token" but its docs require
    "sequence" for LUSPO, which is our default; eps defaults are TRL's.
    """
    return clipped_pg(inp, eps_low=eps_low, eps_high=eps_high, level=level, delta=delta)


@LOSSES.register("cispo", reduction="token-mean", needs=())
def cispo(inp: PolicyLossInput, *, eps_max: float = 5.0, eps_min: Optional[float] = None,
          level: str = "token") -> tuple[Tensor, Metrics]:
    """CISPO: clip the importance weight, not the update: -sg[min(r, eps_max)] A log pi (arXiv:2506.13585).

    The weight is detached, so every token keeps a gradient (REINFORCE weighted by the clipped
    ratio). TRL 1.16 ``loss_type="cispo"`` (L3106-L3108) clips from above only, at its
    ``epsilon_high`` (an absolute bound on r, 5.0 recommended after ScaleRL arXiv:2510.13786);
    the MiniMax-M1 paper also allows a lower bound (``eps_min``, off by default as in TRL). verl and
    SkyRL clip the weight to the relative range [1 - eps_low, 1 + eps_high]: eps_min = 1 - eps_low,
    eps_max = 1 + eps_high here gives theirs.
    Returns:
        (per_token_loss [N, T], {"clip/frac": share of tokens with A > 0 whose ratio exceeds
        eps_max (TRL's ``cispo_clip_ratio``), "ratio/mean"}).
    """
    mask = inp.mask
    ratio = torch.exp(log_importance_ratio(inp.logp, inp.old_logp, mask, level=level))  # [N, T]
    weight = ratio.clamp(min=eps_min, max=eps_max).detach()  # [N, T]
    adv = masked(inp.advantages, mask)  # [N, T]
    loss = -weight * adv * masked(inp.logp, mask)  # [N, T]
    metrics = {
        "clip/frac": masked_mean(((ratio > eps_max) & (adv > 0)).to(ratio.dtype), mask).detach(),
        "ratio/mean": masked_mean(ratio, mask).detach(),
    }
    return masked(loss, mask), metrics


@LOSSES.register("sapo", reduction="seq-mean-token-mean", needs=())
def sapo(inp: PolicyLossInput, *, tau_pos: float = 1.0, tau_neg: float = 1.05,
         level: str = "token") -> tuple[Tensor, Metrics]:
    """SAPO: a soft gate instead of the hard clip (arXiv:2511.20347), as TRL 1.16 ``loss_type="sapo"``.

    per-token loss = -f(r) A with f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A > 0
    else tau_neg (TRL L3121-L3124). f(1) = 2/tau, f'(r) = 4 s (1 - s), s = sigmoid(tau (r - 1)),
    so on-policy the gradient is exactly -A grad log pi and it decays smoothly as r leaves 1.
    Defaults are TRL's ``sapo_temperature_pos`` / ``sapo_temperature_neg``; reduction TRL's
    (seq-mean-token-mean, L3153).
    Returns:
        (per_token_loss [N, T], {"ratio/mean", "sapo/gate_mean": mean f'(r)}).
    """
    mask = inp.mask
    ratio = torch.exp(log_importance_ratio(inp.logp, inp.old_logp, mask, level=level))  # [N, T]
    adv = masked(inp.advantages, mask)  # [N, T]
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # [N, T]
    gate = torch.sigmoid(tau * (ratio - 1.0))  # [N, T]
    loss = -gate * 4.0 / tau * adv  # [N, T]
    metrics = {
        "ratio/mean": masked_mean(ratio, mask).detach(),
        "sapo/gate_mean": masked_mean(4.0 * gate * (1.0 - gate), mask).detach(),
    }
    return masked(loss, mask), metrics


def gamma_weight(log_w: Tensor, adv: Tensor, *, k_pos: float, lambda_pos: float, k_neg: float,
                 lambda_neg: float) -> Tensor:
    """VESPO's phi(w) = exp(lambda + k log w - lambda w), normalised so phi(1) = 1; (k, lambda)
    by the sign of A (A >= 0: pos). ``log_w`` is clamped to [log 1e-8, 20] as TRL L2996-L3007.
    Shapes broadcast; detached."""
    log_w = log_w.detach().clamp(math.log(1e-8), 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, torch.full_like(adv, k_pos), torch.full_like(adv, k_neg))
    lam = torch.where(nonneg, torch.full_like(adv, lambda_pos), torch.full_like(adv, lambda_neg)).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@LOSSES.register("vespo", reduction="token-mean", needs=())
def vespo(inp: PolicyLossInput, *, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
          lambda_neg: float = 2.0) -> tuple[Tensor, Metrics]:
    """VESPO (arXiv:2602.10693) as TRL 1.16 ``loss_type="vespo"``: -sg[phi(w)] A log pi.

    w = exp(sum_t log pi/pi_old) is the SEQUENCE ratio (a sum, not GSPO's mean; each token's
    log-ratio clamped to [-20, 20], TRL L2994-L2999) and phi the Gamma weight
    ``gamma_weight``; reduction token-mean as TRL's (L3174). Defaults are TRL's ``vespo_*``.
    Returns:
        (per_token_loss [N, T], {"ratio/mean": mean sequence ratio, "vespo/phi_mean"}).
    """
    mask = inp.mask
    log_ratio = masked((inp.logp - inp.old_logp).clamp(-20.0, 20.0), mask).detach()  # [N, T]
    log_w = seq_sum(log_ratio, mask)[:, None]  # [N, 1]
    adv = masked(inp.advantages, mask)  # [N, T]
    phi = gamma_weight(log_w, adv, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg)  # [N, T]
    loss = -phi * adv * masked(inp.logp, mask)  # [N, T]
    metrics = {
        "ratio/mean": torch.exp(log_w).mean().detach(),
        "vespo/phi_mean": masked_mean(phi, mask).detach(),
    }
    return masked(loss, mask), metrics
