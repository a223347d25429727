"""Closed-form fixed points other than the tilted optimum, for methods that claim them.

* forward KL: argmax_p sum_a p(a) v(a) - beta KL(p_ref || p) over the simplex has the
  stationarity condition v(a) + beta p_ref(a)/p(a) = lambda, i.e.
  p(a) = beta p_ref(a) / (lambda - v(a)), with lambda in (max v, max v + beta] fixed by
  sum_a p(a) = 1 (one-dimensional root, found by bisection to machine precision).
* per-state (token-level) KL: a loss that puts D(pi(.|s), pi_ref(.|s)) on every visited state
  with the state distribution held fixed (per-token KL in the loss) has the fixed point
  pi(.|s) = argmax_p sum_a p(a) Q_r(s, a) - beta D(p, pi_ref(.|s)), where Q_r is the
  reward-only value of continuing with pi itself (no future KL in it). Solved by backward
  induction. On one-token problems (bandits) it equals the sequence-level optimum.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.exact.bandit import Bandit
from tilt.exact.enumeration import sequence_probs
from tilt.exact.tree import level_offset


def reverse_kl_tilt(logp_ref: Tensor, values: Tensor, beta: float) -> Tensor:
    """argmax_p <p, v> - beta KL(p || p_ref) = softmax(log p_ref + v / beta), [..., K]."""
    return torch.softmax(logp_ref + values / beta, dim=-1)


def forward_kl_tilt(logp_ref: Tensor, values: Tensor, beta: float, *, iters: int = 200) -> Tensor:
    """argmax_p <p, v> - beta KL(p_ref || p) = beta p_ref / (lambda - v), [..., K] (bisection)."""
    p_ref = logp_ref.exp()  # [..., K]
    lo = values.max(-1, keepdim=True).values  # [..., 1] sum -> +inf here
    hi = lo + beta  # [..., 1] sum <= 1 here
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        total = (beta * p_ref / (mid - values)).sum(-1, keepdim=True)  # [..., 1]
        lo = torch.where(total > 1.0, mid, lo)
        hi = torch.where(total > 1.0, hi, mid)
    p = beta * p_ref / (hi - values)  # [..., K]
    return p / p.sum(-1, keepdim=True)


TILTS = {"reverse": reverse_kl_tilt, "forward": forward_kl_tilt}


def forward_kl_optimum(problem, beta: float) -> Tensor:
    """Sequence-level argmax E[r] - beta KL(pi_ref || pi): beta pi_ref(y) / (lambda_x - r), [X, Y]."""
    ref_seq = sequence_probs(problem, torch.softmax(problem.ref_logits, -1))  # [X, Y]
    rewards = problem.enumerate().rewards.reshape(ref_seq.shape)  # [X, Y]
    return forward_kl_tilt(ref_seq.log(), rewards, beta)


def per_state_fixed_point(problem, beta: float, *, divergence: str = "reverse") -> Tensor:
    """Fixed point of a per-state KL penalty (module docstring), probs table [S, V]."""
    tilt = TILTS[divergence]
    logp_ref = torch.log_softmax(problem.ref_logits, -1)  # [S, V]
    if isinstance(problem, Bandit):
        return tilt(logp_ref, problem.rewards, beta)
    v, d = problem.vocab, problem.depth
    probs = torch.empty_like(logp_ref)  # [S, V]
    q = problem.rewards.reshape(-1, v)  # [V^(d-1), V] at the last level
    for level in range(d - 1, -1, -1):
        lo, hi = level_offset(level, v), level_offset(level + 1, v)
        probs[lo:hi] = tilt(logp_ref[lo:hi], q, beta)
        if level > 0:  # reward-only state values become the parents' Q
            q = (probs[lo:hi] * q).sum(-1).reshape(-1, v)
    return probs


def state_visit_probs(problem, probs: Tensor) -> Tensor:
    """d(s) = sum_x p(x) P_pi(reach s | x) for every state, [S], under a probs table [S, V]."""
    enum = problem.enumerate()
    seq = torch.exp(torch.log(probs)[enum.states, enum.tokens].sum(-1)) * enum.prompt_prob  # [N]
    n, t = enum.states.shape
    visits = torch.zeros(probs.shape[0], dtype=probs.dtype)
    return visits.index_add(0, enum.states.reshape(-1), seq[:, None].expand(n, t).reshape(-1))
