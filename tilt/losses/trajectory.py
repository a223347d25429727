"""Trajectory-level losses (catalogue B4, B8).

    haepo    Plackett-Luce softmax of trajectory log-likelihoods, arXiv:2508.18884
    astar_po optimal-advantage regression with an offline V*, arXiv:2505.20686

Both are sequence-level: each sequence's value is spread over its tokens
(``tilt.losses.policy.spread``) and reduced with ``seq-mean-token-sum``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.losses.policy import Metrics, group_sum, masked, seq_mean, seq_sum, spread


def group_softmax(scores: Tensor, group_index: Tensor) -> Tensor:
    """Softmax of ``scores`` [N] within each group (Plackett-Luce top-1 probabilities), [N]."""
    n_groups = int(group_index.max()) + 1
    group_max = torch.full((n_groups,), -math.inf, dtype=scores.dtype, device=scores.device)
    group_max = group_max.scatter_reduce(0, group_index, scores.detach(), reduce="amax")  # [G]
    expd = torch.exp(scores - group_max[group_index])  # [N]
    return expd / group_sum(expd, group_index)


@LOSSES.register("haepo", reduction="seq-mean-token-sum", needs=("group_index", "entropy", "prev_logp"))
def haepo(inp: PolicyLossInput, *, temperature: float = 1.0, entropy_coef: float = 0.01,
          kl_coef: float = 0.01) -> tuple[Tensor, Metrics]:
    """HAEPO (Sec. 3, arXiv:2508.18884): -sum_k w_k R~_k - c_H H + c_KL KL(pi || pi_prev).

        L_k = sum_t log pi(y_t^k)                         cumulative log-likelihood of trajectory k
        w_k = exp(L_k / tau) / sum_{j in group} exp(L_j / tau)   Plackett-Luce softmax weights
        R~_k = the trajectory's normalised return (here: its advantage, e.g. group-normalised)

    The group term -sum_k w_k R~_k enters as -|g| w_k R~_k per sequence, so the mean over
    sequences is the mean over equal-size groups. Entropy (``inp.entropy``, optional) and the
    soft KL to the frozen previous policy (``prev_logp``, k3 estimator, optional) are summed
    over each trajectory's tokens.

    Sources read: the abstract and a literature review of the paper (themoonlight.io review of
    arXiv:2508.18884), which confirm L_k (step 1) and w_k = softmax of the L_k over the episodes
    of a batch (step 2). Not confirmed (paper body and code not found): the return
    normalisation R~, the temperature, the exact entropy and KL estimators and their
    coefficients -- the defaults here are ours. When a group enumerates every trajectory once,
    w_k = pi(y_k) and the group term's gradient is the exact policy gradient of E_pi[R~], so the
    weights concentrate on the best trajectory (tests/test_losses_trajectory.py).
    """
    if inp.group_index is None:
        raise ValueError("haepo needs PolicyLossInput.group_index")
    mask = inp.mask
    traj_ll = seq_sum(inp.logp, mask)  # [N] L_k
    weights = group_softmax(traj_ll / temperature, inp.group_index)  # [N] w_k
    returns = seq_mean(inp.advantages, mask).detach()  # [N] R~_k
    size = group_sum(torch.ones_like(weights), inp.group_index)  # [N] |g|
    loss = spread(-size * weights * returns, mask)  # [N, T]
    metrics = {"haepo/weight_max": weights.max().detach()}
    if inp.entropy is not None and entropy_coef:
        loss = loss - entropy_coef * masked(inp.entropy, mask)
        metrics["entropy"] = seq_mean(inp.entropy, mask).mean().detach()
    if inp.prev_logp is not None and kl_coef:
        log_rho = masked(inp.prev_logp - inp.logp, mask)  # [N, T] log pi_prev / pi
        k3 = torch.exp(log_rho) - 1.0 - log_rho  # [N, T]
        loss = loss + kl_coef * k3
        metrics["kl/prev_k3"] = seq_sum(k3, mask).mean().detach()
    return masked(loss, mask), metrics


def astar_v_star(ref_rewards: Tensor, *, beta: float) -> Tensor:
    """A*-PO stage 1: V*(x) = beta log mean_j exp(r(x, y_j) / beta), y_j ~ pi_ref (stage 1, Sec. 3, arXiv:2505.20686).

    Args:
        ref_rewards: [B, M] rewards of M offline reference samples per prompt.
        beta: the KL coefficient of the objective (the paper's beta_1).
    Returns:
        [B] estimate of the soft value V*(x) = beta log E_{pi_ref} exp(r/beta), computed with
        logsumexp so small beta does not overflow.
    """
    m = ref_rewards.shape[-1]
    return beta * (torch.logsumexp(ref_rewards / beta, dim=-1) - math.log(m))


@LOSSES.register("astar_po", reduction="seq-mean-token-sum", needs=("ref_logp", "rewards", "baseline_v"))
def astar_po(inp: PolicyLossInput, *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """A*-PO stage 2: (beta log pi(y|x)/pi_ref(y|x) - (r(x, y) - V*(x)))^2 (stage 2, Sec. 3, arXiv:2505.20686).

    One sample per prompt; mean over sequences as the reference code (ZhaolinGao/A-PO
    verl/trainer/apo/core_algos.py ``compute_policy_loss``). The minimiser is
    beta log pi/pi_ref = r - V*, i.e. pi* = pi_ref exp(r/beta) / Z exactly when V* is exact.
    ``beta`` here is the paper's beta_2; V* (``baseline_v``) comes from ``astar_v_star``.
    """
    if inp.ref_logp is None or inp.rewards is None or inp.baseline_v is None:
        raise ValueError("astar_po needs PolicyLossInput.ref_logp, rewards and baseline_v")
    mask = inp.mask
    log_ratio = seq_sum(inp.logp - inp.ref_logp, mask)  # [N] log pi(y|x)/pi_ref(y|x)
    residual = beta * log_ratio - (inp.rewards.to(log_ratio.dtype) - inp.baseline_v.to(log_ratio.dtype))  # [N]
    per_seq = residual**2  # [N]
    return spread(per_seq, mask), {"astar/residual_abs": residual.abs().mean().detach()}
