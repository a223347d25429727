"""Peer losses that reshape the PPO trust region (catalogue B11): dual-clip, GMPO, Clip-Cov, KL-Cov.

    dual_clip   PPO with a lower bound c*A on negative-advantage tokens, arXiv:1912.09729 (verl "vanilla")
    gmpo        geometric mean of clipped token ratios, arXiv:2507.20673 (TRL experimental GMPOTrainer)
    clip_cov    PPO-clip + no gradient for a random few high-covariance tokens, arXiv:2505.22617
    kl_cov      REINFORCE ratio surrogate + |log pi - log pi_old| on the top-covariance tokens, arXiv:2505.22617

Clip-Cov and KL-Cov select tokens by their centred covariance over the (micro-)batch,
Cov_t = (log pi(y_t) - mean log pi) (A_t - mean A) (arXiv:2505.22617 Sec. 4; the means are over
every completion token the loss sees, as verl's ``compute_policy_loss_clip_cov`` /
``_kl_cov``). They are batch-level rules: like verl, tilt computes them per micro-batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.losses.policy import Metrics, clipped_surrogate, masked, seq_mean
from tilt.reduction import masked_mean


@LOSSES.register("dual_clip", reduction="token-mean", needs=())
def dual_clip(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2,
              clip_c: float = 3.0) -> tuple[Tensor, Metrics]:
    """Dual-clip PPO: -max(min(r A, clip(r) A), c A) for A < 0, PPO-clip for A >= 0 (arXiv:1912.09729 Sec. 3).

    With A < 0 and a large ratio, PPO's loss -r A grows without bound; the second clip caps it
    at -c A (c > 1; 3.0 is verl's ``clip_ratio_c`` default), and no gradient flows there.
    Returns:
        (per_token_loss [N, T], {"clip/frac", "clip/dual_frac": share of tokens capped at -c A, "ratio/mean"}).
    """
    if clip_c <= 1.0:
        raise ValueError(f"dual_clip needs clip_c > 1, got {clip_c}")
    mask = inp.mask
    ratio = torch.exp(masked(inp.logp - inp.old_logp, mask))  # [N, T]
    adv = masked(inp.advantages, mask)  # [N, T]
    loss, binds = clipped_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high)  # [N, T]
    cap = -clip_c * adv  # [N, T]
    dual = (adv < 0) & (loss > cap)  # [N, T]
    loss = torch.where(dual, cap, loss)  # [N, T]
    metrics = {
        "clip/frac": masked_mean(binds.to(ratio.dtype), mask).detach(),
        "clip/dual_frac": masked_mean(dual.to(ratio.dtype), mask).detach(),
        "ratio/mean": masked_mean(ratio, mask).detach(),
    }
    return masked(loss, mask), metrics


@LOSSES.register("gmpo", reduction="seq-mean-token-mean", needs=())
def gmpo(inp: PolicyLossInput, *, eps_low: float = 0.4, eps_high: float = 0.4) -> tuple[Tensor, Metrics]:
    """GMPO: maximise the geometric mean of the token terms (arXiv:2507.20673, Sec. 3; TRL 1.16
    trl/experimental/gmpo/gmpo_trainer.py ``_compute_loss``).

    log rho_t is clipped in LOG space to [-eps_low, eps_high], one-sided by the sign of A
    (min(log rho, clip) for A > 0, max for A <= 0: PPO's trust region), then
    w_i = exp(mean_t clipped log rho_t) and the sequence loss is -w_i A_i. The 1/|o_i| exponent
    sits inside w_i, so the reduction is a plain mean over sequences (seq-mean-token-mean with A
    constant in a sequence). Defaults exp(+-0.4) as the paper (Sec. 4) and TRL's GMPOConfig.
    On-policy grad w_i = mean_t grad log pi(y_t): a length-normalised score function.
    Returns:
        (per_token_loss [N, T], {"clip/frac", "ratio/mean": mean w_i}).
    """
    mask = inp.mask
    log_ratio = masked(inp.logp - inp.old_logp, mask)  # [N, T]
    adv = masked(inp.advantages, mask)  # [N, T]
    clamped = log_ratio.clamp(-eps_low, eps_high)  # [N, T]
    clipped = torch.where(adv > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))  # [N, T]
    w = torch.exp(seq_mean(clipped, mask))  # [N]
    loss = -w[:, None] * adv  # [N, T]
    binds = ((log_ratio > eps_high) & (adv > 0)) | ((log_ratio < -eps_low) & (adv < 0))  # [N, T]
    metrics = {
        "clip/frac": masked_mean(binds.to(w.dtype), mask).detach(),
        "ratio/mean": w.mean().detach(),
    }
    return masked(loss, mask), metrics


def token_covariance(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Cov_t = (log pi(y_t) - mean log pi)(A_t - mean A), means over the masked tokens; detached. [N, T]."""
    lp = logp.detach()
    return (lp - masked_mean(lp, mask)) * (adv - masked_mean(adv, mask))


def _compact(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The masked tokens of ``x`` in row-major order [M] and their flat indices [M] (layout-free)."""
    idx = (mask.flatten() > 0).nonzero().squeeze(-1)  # [M]
    return x.flatten()[idx], idx


@LOSSES.register("clip_cov", reduction="token-mean", needs=())
def clip_cov(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2, ratio: float = 2e-4,
             cov_low: float = 1.0, cov_high: float = 5.0, seed: int = 0) -> tuple[Tensor, Metrics]:
    """Clip-Cov (arXiv:2505.22617 Sec. 4.2): PPO-clip, and max(1, int(ratio * n_tokens)) tokens
    drawn at random among those with cov_low < Cov_t < cov_high (not already clipped) get no
    gradient (their loss is zeroed, as verl; the paper "detaches" them: same gradient).

    Defaults are verl's (clip_cov_ratio 2e-4, lb 1, ub 5). The draw is a pseudo-random order of
    the batch's masked tokens from ``seed`` (row-major, so padding does not change it); the
    learner's shuffled mini-batches make it differ from step to step.
    Returns:
        (per_token_loss [N, T], {"clip/frac", "cov/clipped_frac", "cov/mean", "ratio/mean"}).
    """
    mask = inp.mask
    r = torch.exp(masked(inp.logp - inp.old_logp, mask))  # [N, T]
    adv = masked(inp.advantages, mask)  # [N, T]
    loss, binds = clipped_surrogate(r, adv, eps_low=eps_low, eps_high=eps_high)  # [N, T]
    cov = token_covariance(masked(inp.logp, mask), adv, mask)  # [N, T]
    eligible = (cov > cov_low) & (cov < cov_high) & ~((loss > -r * adv) & (mask > 0))  # [N, T]
    elig_c, idx = _compact(eligible, mask)  # [M]
    prio = torch.rand(idx.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # [M]
    prio = torch.where(elig_c, prio, torch.full_like(prio, -1.0))
    n_pick = min(max(1, int(ratio * idx.numel())), int(elig_c.sum()))
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[idx[prio.topk(n_pick).indices]] = True
    chosen = chosen.view(mask.shape)  # [N, T]
    loss = torch.where(chosen, torch.zeros_like(loss), loss)  # [N, T]
    metrics = {
        "clip/frac": masked_mean(binds.to(r.dtype), mask).detach(),
        "cov/clipped_frac": masked_mean(chosen.to(r.dtype), mask).detach(),
        "cov/mean": masked_mean(cov, mask).detach(),
        "ratio/mean": masked_mean(r, mask).detach(),
    }
    return masked(loss, mask), metrics


@LOSSES.register("kl_cov", reduction="token-mean", needs=())
def kl_cov(inp: PolicyLossInput, *, ratio: float = 2e-4, coef: float = 1.0) -> tuple[Tensor, Metrics]:
    """KL-Cov (arXiv:2505.22617 Sec. 4.2): -r A on every token, plus coef * |log pi - log pi_old| on
    the max(1, int(ratio * n_tokens)) tokens of largest Cov_t (no PPO clip, as verl's ``kl_cov``).

    Defaults are verl's (kl_cov_ratio 2e-4, ppo_kl_coef 1). On-policy the penalty and its
    gradient are 0 (d|x|/dx at 0 is 0 in torch), so one update per batch is plain policy
    gradient; it acts from the second epoch on.
    Returns:
        (per_token_loss [N, T], {"cov/penalised_frac", "cov/mean", "ratio/mean"}).
    """
    mask = inp.mask
    log_ratio = masked(inp.logp - inp.old_logp, mask)  # [N, T]
    r = torch.exp(log_ratio)  # [N, T]
    adv = masked(inp.advantages, mask)  # [N, T]
    cov = token_covariance(masked(inp.logp, mask), adv, mask)  # [N, T]
    cov_c, idx = _compact(cov, mask)  # [M]
    k = min(max(1, int(ratio * idx.numel())), idx.numel())
    top = torch.zeros(mask.numel(), dtype=torch.bool)
    top[idx[cov_c.topk(k).indices]] = True
    top = top.view(mask.shape)  # [N, T]
    loss = -r * adv + torch.where(top, coef * log_ratio.abs(), torch.zeros_like(r))  # [N, T]
    metrics = {
        "cov/penalised_frac": masked_mean(top.to(r.dtype), mask).detach(),
        "cov/mean": masked_mean(cov, mask).detach(),
        "ratio/mean": masked_mean(r, mask).detach(),
    }
    return masked(loss, mask), metrics
