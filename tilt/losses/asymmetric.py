"""Losses that treat positive and negative samples differently (catalogue B2, B3, B7).

    topr          Tapered Off-Policy REINFORCE, arXiv:2503.14286
    psr, nsr,     positive / negative sample reinforcement and their weighted mix,
    w_reinforce   arXiv:2506.01347 ("The Surprising Effectiveness of Negative Reinforcement")
    lens          confidence-weighted penalties on wrong answers, arXiv:2510.08696
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.losses.policy import Metrics, clipped_surrogate, group_mean, group_sum, masked, seq_mean, seq_sum
from tilt.reduction import masked_mean


@LOSSES.register("topr", reduction="seq-mean-token-sum", needs=())
def topr(inp: PolicyLossInput, *, level: str = "sequence") -> tuple[Tensor, Metrics]:
    """TOPR: SFT-like updates on positives, truncated IS on negatives (Sec. 3, arXiv:2503.14286).

    grad J = sum_{A >= 0} mu(tau) A grad log pi(tau) + sum_{A < 0} mu(tau) [pi(tau)/mu(tau)]_0^1 A grad log pi(tau)

    mu is the behaviour policy (``old_logp``, may be a fixed offline dataset policy), so TOPR
    runs fully offline. The paper writes R(tau) (minus its baseline c); here that is the
    advantage, whose sign picks the branch. The truncated ratio is detached (stop-gradient).
    Args:
        level: "sequence" (the paper: pi(tau)/mu(tau) = exp sum_t log-ratio) or "token"
            (per-token ratios, as e.g. Trinity-RFT's implementation).
    Returns:
        (per_token_loss [N, T] = -w A log pi(y_t), {"clip/frac": share of negative tokens whose
        ratio was truncated at 1, "ratio/mean", "topr/neg_weight"}).
    """
    mask = inp.mask
    adv = masked(inp.advantages, mask)  # [N, T]
    log_ratio = masked(inp.logp - inp.old_logp, mask).detach()  # [N, T]
    if level == "sequence":
        log_ratio = seq_sum(log_ratio, mask)[:, None].expand_as(log_ratio)  # [N, T]
    elif level != "token":
        raise ValueError(f"unknown TOPR level {level!r}; valid: 'sequence', 'token'")
    truncated = torch.exp(log_ratio.clamp(max=0.0))  # [N, T] = min(pi/mu, 1)
    negative = adv < 0  # [N, T]
    weight = torch.where(negative, truncated, torch.ones_like(truncated))  # [N, T]
    loss = -weight * adv * masked(inp.logp, mask)  # [N, T]
    neg_mask = mask * negative.to(mask.dtype)  # [N, T]
    metrics = {
        "clip/frac": masked_mean((log_ratio > 0).to(mask.dtype), neg_mask).detach(),
        "ratio/mean": masked_mean(torch.exp(log_ratio), mask).detach(),
        "topr/neg_weight": masked_mean(truncated, neg_mask).detach(),
    }
    return masked(loss, mask), metrics


def signed_sample_loss(inp: PolicyLossInput, *, pos_weight: float, neg_weight: float,
                       threshold: float, eps: float) -> tuple[Tensor, Metrics]:
    """PSR/NSR family: advantage +pos_weight on correct samples, -neg_weight on wrong ones.

    L = pos_weight * L_PSR + neg_weight * L_NSR with rewards +-1 (Eqs. 2-4 and the W-REINFORCE
    objective, arXiv:2506.01347); the reference code (TianHongZXY/RLVR-Decomposed,
    verl/trainer/ppo/core_algos.py ``compute_psr_nsr_outcome_advantage`` / ``compute_policy_loss``)
    feeds these advantages to the PPO-clip surrogate, token-mean; on-policy (ratio 1) that is
    plain REINFORCE. A sample is correct when ``rewards > threshold``.
    """
    if inp.rewards is None:
        raise ValueError("PSR/NSR losses need PolicyLossInput.rewards")
    mask = inp.mask
    correct = (inp.rewards > threshold)[:, None].expand(mask.shape)  # [N, T]
    adv = torch.where(correct, torch.full_like(inp.logp, pos_weight), torch.full_like(inp.logp, -neg_weight))
    ratio = torch.exp(masked(inp.logp - inp.old_logp, mask))  # [N, T]
    loss, binds = clipped_surrogate(ratio, adv, eps_low=eps, eps_high=eps)  # [N, T]
    metrics = {
        "clip/frac": masked_mean(binds.to(ratio.dtype), mask).detach(),
        "ratio/mean": masked_mean(ratio, mask).detach(),
        "psr/correct_frac": masked_mean(correct.to(ratio.dtype), mask).detach(),
    }
    return masked(loss, mask), metrics


@LOSSES.register("psr", reduction="token-mean", needs=("rewards",))
def psr(inp: PolicyLossInput, *, threshold: float = 0.5, eps: float = 0.2) -> tuple[Tensor, Metrics]:
    """Positive Sample Reinforcement only: raise the likelihood of correct samples (arXiv:2506.01347)."""
    return signed_sample_loss(inp, pos_weight=1.0, neg_weight=0.0, threshold=threshold, eps=eps)


@LOSSES.register("nsr", reduction="token-mean", needs=("rewards",))
def nsr(inp: PolicyLossInput, *, threshold: float = 0.5, eps: float = 0.2) -> tuple[Tensor, Metrics]:
    """Negative Sample Reinforcement only: lower the likelihood of wrong samples (arXiv:2506.01347)."""
    return signed_sample_loss(inp, pos_weight=0.0, neg_weight=1.0, threshold=threshold, eps=eps)


@LOSSES.register("w_reinforce", reduction="token-mean", needs=("rewards",))
def w_reinforce(inp: PolicyLossInput, *, lam: float = 0.1, threshold: float = 0.5,
                eps: float = 0.2) -> tuple[Tensor, Metrics]:
    """W-REINFORCE: lam * L_PSR + L_NSR, up-weighting NSR; the paper recommends lam = 0.1 (arXiv:2506.01347)."""
    return signed_sample_loss(inp, pos_weight=lam, neg_weight=1.0, threshold=threshold, eps=eps)


def lens_rewards(rewards: Tensor, confidence: Tensor, *, threshold: float = 0.5, scale: float = 1.0,
                 max_confidence: float = 0.999) -> Tensor:
    """LENS-modified rewards: r~ = r on correct samples, -scale * c / (1 - c) on wrong ones. [N] -> [N].

    Derivation (our reading of the abstract of arXiv:2510.08696; the paper body and code were not
    found, so the exact confidence c and any normalisation are unconfirmed): treat the model's confidence
    c = p_theta(y|x) as the probability that y is correct and maximise the Bernoulli likelihood
    sum_i r_i log c_i + (1 - r_i) log(1 - c_i). Its gradient is sum_i r~_i grad log p_theta(y_i|x)
    with r~ as above: a policy gradient whose penalty on a wrong answer grows with the
    confidence placed in it, so all-wrong groups still have non-zero advantages.
    """
    c = confidence.clamp(min=0.0, max=max_confidence)  # [N]
    correct = rewards > threshold  # [N]
    return torch.where(correct, rewards, -scale * c / (1.0 - c))


@LOSSES.register("lens", reduction="seq-mean-token-mean", needs=("rewards", "group_index"))
def lens(inp: PolicyLossInput, *, confidence: str = "token_geomean", scale: float = 1.0, threshold: float = 0.5,
         eps_low: float = 0.2, eps_high: float = 0.2, std_eps: float = 1e-4) -> tuple[Tensor, Metrics]:
    """LENS: GRPO on confidence-reweighted rewards (arXiv:2510.08696; rewards via ``lens_rewards``).

    Args:
        confidence: "sequence" (c = pi_old(y|x), the likelihood derivation) or "token_geomean"
            (c = exp(mean_t log pi_old(y_t)), length-normalised so long completions are not
            all c ~ 0). Computed from the sampling policy, detached.
        scale, threshold: see ``lens_rewards``. eps_low, eps_high: PPO clip range.
        std_eps: GRPO advantage (r~ - mean_g r~) / (std_g + std_eps) within each group
            (unbiased std, as torch.std in TRL/verl).
    """
    if inp.rewards is None or inp.group_index is None:
        raise ValueError("lens needs PolicyLossInput.rewards and group_index")
    mask = inp.mask
    old = masked(inp.old_logp, mask).detach()  # [N, T]
    if confidence == "sequence":
        conf = torch.exp(seq_sum(old, mask))  # [N]
    elif confidence == "token_geomean":
        conf = torch.exp(seq_mean(old, mask))  # [N]
    else:
        raise ValueError(f"unknown LENS confidence {confidence!r}; valid: 'sequence', 'token_geomean'")
    r_mod = lens_rewards(inp.rewards.to(conf.dtype), conf, threshold=threshold, scale=scale)  # [N]
    centred = r_mod - group_mean(r_mod, inp.group_index)  # [N]
    n = group_sum(torch.ones_like(centred), inp.group_index)  # [N] group sizes
    std = (group_sum(centred**2, inp.group_index) / (n - 1.0).clamp(min=1.0)).sqrt()  # [N] unbiased, as torch.std
    adv = (centred / (std + std_eps))[:, None].expand(mask.shape)  # [N, T]
    ratio = torch.exp(masked(inp.logp - inp.old_logp, mask))  # [N, T]
    loss, binds = clipped_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high)
    metrics = {
        "clip/frac": masked_mean(binds.to(ratio.dtype), mask).detach(),
        "ratio/mean": masked_mean(ratio, mask).detach(),
        "lens/reward_mean": r_mod.mean().detach(),
    }
    return masked(loss, mask), metrics
