"""Losses that treat positive and negative samples differently (catalogue B2, B3, B7).

    topr          Tapered Off-Policy REINFORCE, arXiv:2503.14286
    psr, nsr,     positive / negative sample reinforcement and their weighted mix,
    w_reinforce   arXiv:2506.01347 ("The Surprising Effectiveness of Negative Reinforcement")
    lens          confidence-calibrated rewards for wrong answers, arXiv:2510.08696 (Eq. 10, Sec. 5.1)
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


def group_max(values: Tensor, group_index: Tensor) -> Tensor:
    """Max of ``values`` [N] over each sequence's group, returned per sequence [N]."""
    n_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    out = torch.full((n_groups,), -torch.inf, dtype=values.dtype, device=values.device)
    return out.index_reduce(0, group_index, values, "amax")[group_index]


def lens_rewards(rewards: Tensor, confidence: Tensor, group_index: Tensor, *, threshold: float = 0.5) -> Tensor:
    """LENS calibrated rewards (arXiv:2510.08696 Eq. 10 and Sec. 5.1 "Calibrated Reward (per sample)"). [N] -> [N].

        r~_i = r_i - (1 - r_i) (1/G) c_i / (D(q) - c_i)

    c_i the confidence of sample i (Sec. 5.1 uses the length-normalised pi_old(o|q)^(1/|o|)), G its
    group's size, and the difficulty D(q) = max(D_imp(q), 2 max_j c_j) in a group with a correct
    sample, 2 max_j c_j in a negative group, where D_imp(q) = [(1/G) sum_i r_i / c_i]^(-1) is the
    importance-sampling estimate of Eq. 14 (the paper writes pi_old there; we use the same c_i as
    in the ratio, so D and c are on one scale -- our reading). The factor 2 keeps r~ in [-1, 1] and
    1/G keeps every wrong sample below every correct one after normalisation (Sec. 5.1). A sample
    is correct when r > ``threshold`` (rewards are 0/1 in the paper).
    """
    g = group_sum(torch.ones_like(rewards), group_index)  # [N] group sizes
    correct = (rewards > threshold).to(rewards.dtype)  # [N]
    top = 2.0 * group_max(confidence, group_index)  # [N]
    r_over_c = torch.where(rewards != 0, rewards / confidence.clamp(min=1e-30), torch.zeros_like(rewards))  # [N]
    inv_d = group_sum(r_over_c, group_index) / g  # [N] (1/G) sum r_i / c_i
    d_imp = torch.where(inv_d > 0, 1.0 / inv_d.clamp(min=1e-30), torch.zeros_like(inv_d))  # [N]
    mixed = group_sum(correct, group_index) > 0  # [N]
    d = torch.where(mixed, torch.maximum(d_imp, top), top)  # [N]
    return rewards - (1.0 - rewards) * confidence / (g * (d - confidence).clamp(min=1e-30))


@LOSSES.register("lens", reduction="seq-mean-token-mean", needs=("rewards", "group_index"))
def lens(inp: PolicyLossInput, *, confidence: str = "token_geomean", alpha: float = 0.25, threshold: float = 0.5,
         eps_low: float = 0.2, eps_high: float = 0.2, std_eps: float = 1e-4) -> tuple[Tensor, Metrics]:
    """LENS: the GRPO surrogate on calibrated rewards (arXiv:2510.08696 Sec. 5; rewards via ``lens_rewards``).

    Advantages (Sec. 5.1 "Final Objective"): in a group with a correct sample, GRPO's
    (r~ - mean_g r~) / (std_g r~ + std_eps) (unbiased std, as torch.std in TRL/verl); in a negative
    (all-wrong) group only the de-meaning, weighted by ``alpha`` (0.25, the paper's value):
    J = J_GRPO[mixed] + alpha J_GRPO[negative]. The GRPO loss itself is unchanged (Eq. 3).
    Args:
        confidence: "token_geomean" (c = exp(mean_t log pi_old(y_t)) = pi_old(o|q)^(1/|o|), Sec. 5.1)
            or "sequence" (c = pi_old(o|q), the theory of Sec. 4). Detached.
        threshold: see ``lens_rewards``. eps_low, eps_high: PPO clip range.
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
    rewards, gi = inp.rewards.to(conf.dtype), inp.group_index
    r_mod = lens_rewards(rewards, conf, gi, threshold=threshold)  # [N]
    centred = r_mod - group_mean(r_mod, gi)  # [N]
    n = group_sum(torch.ones_like(centred), gi)  # [N] group sizes
    std = (group_sum(centred**2, gi) / (n - 1.0).clamp(min=1.0)).sqrt()  # [N] unbiased, as torch.std
    mixed = group_sum((rewards > threshold).to(conf.dtype), gi) > 0  # [N]
    adv = torch.where(mixed, centred / (std + std_eps), alpha * centred)[:, None].expand(mask.shape)  # [N, T]
    ratio = torch.exp(masked(inp.logp - inp.old_logp, mask))  # [N, T]
    loss, binds = clipped_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high)
    metrics = {
        "clip/frac": masked_mean(binds.to(ratio.dtype), mask).detach(),
        "ratio/mean": masked_mean(ratio, mask).detach(),
        "lens/reward_mean": r_mod.mean().detach(),
    }
    return masked(loss, mask), metrics
