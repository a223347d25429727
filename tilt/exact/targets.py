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


def tsallis_tilt(logp_ref: Tensor, values: Tensor, beta: float, *, q: float, iters: int = 200) -> Tensor:
    """argmax_p <p, v> - beta D_q(p || p_ref), D_q = sum p (1 - (p_ref/p)^(1-q)) / (1-q), [..., K].

    Stationarity (KKT, q > 0): p = p_ref u with u = [(1 + (q-1)(v - lambda)/beta) / q]_+^(1/(q-1)),
    lambda found by bisection so that sum p = 1 (q > 1 may put exact zeros: sparse policies,
    arXiv:2301.11476). q = 1 is the softmax tilt.
    """
    if q == 1.0:
        return reverse_kl_tilt(logp_ref, values, beta)
    p_ref = logp_ref.exp()  # [..., K]

    def total(lam: Tensor) -> tuple[Tensor, Tensor]:
        base = (1.0 + (q - 1.0) * (values - lam) / beta).clamp(min=0.0)  # [..., K]
        u = torch.where(base > 0, (base / q).clamp(min=1e-300) ** (1.0 / (q - 1.0)), torch.zeros_like(base))
        return (p_ref * u).sum(-1, keepdim=True), p_ref * u

    v_max, v_min = values.max(-1, keepdim=True).values, values.min(-1, keepdim=True).values
    edge = v_max - beta / (1.0 - q) if q < 1.0 else None  # q < 1: base > 0 needs lambda > edge
    lo = edge + 1e-12 * beta if q < 1.0 else v_min - beta  # [..., 1]
    hi = v_max + beta  # [..., 1]
    for _ in range(64):  # widen the bracket: total(lo) > 1 > total(hi)
        hi = torch.where(total(hi)[0] >= 1.0, hi + 2.0 * (hi - lo), hi)
        if q > 1.0:
            lo = torch.where(total(lo)[0] <= 1.0, lo - 2.0 * (hi - lo), lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = total(mid)[0] > 1.0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    p = total(0.5 * (lo + hi))[1]  # [..., K]
    return p / p.sum(-1, keepdim=True)


TILTS = {"reverse": reverse_kl_tilt, "forward": forward_kl_tilt}


def forward_kl_optimum(problem, beta: float) -> Tensor:
    """Sequence-level argmax E[r] - beta KL(pi_ref || pi): beta pi_ref(y) / (lambda_x - r), [X, Y]."""
    ref_seq = sequence_probs(problem, torch.softmax(problem.ref_logits, -1))  # [X, Y]
    rewards = problem.enumerate().rewards.reshape(ref_seq.shape)  # [X, Y]
    return forward_kl_tilt(ref_seq.log(), rewards, beta)


def tsallis_optimum(problem, beta: float, *, q: float) -> Tensor:
    """Sequence-level argmax E[r] - beta D_q(pi || pi_ref) (tsallis_tilt over sequences), [X, Y]."""
    ref_seq = sequence_probs(problem, torch.softmax(problem.ref_logits, -1))  # [X, Y]
    rewards = problem.enumerate().rewards.reshape(ref_seq.shape)  # [X, Y]
    return tsallis_tilt(ref_seq.log(), rewards, beta, q=q)


def per_state_fixed_point(problem, beta: float, *, divergence: str = "reverse", q: float = 2.0) -> Tensor:
    """Fixed point of a per-state penalty (module docstring), probs table [S, V].

    divergence: "reverse" (KL(pi||pi_ref)), "forward" (KL(pi_ref||pi)) or "tsallis" (D_q).
    """
    if divergence == "tsallis":
        tilt = lambda lp, v, b: tsallis_tilt(lp, v, b, q=q)  # noqa: E731
    else:
        tilt = TILTS[divergence]
    logp_ref = torch.log_softmax(problem.ref_logits, -1)  # [S, V]
    if isinstance(problem, Bandit):
        return tilt(logp_ref, problem.rewards, beta)
    v, d = problem.vocab, problem.depth
    probs = torch.empty_like(logp_ref)  # [S, V]
    q_vals = problem.rewards.reshape(-1, v)  # [V^(d-1), V] at the last level
    for level in range(d - 1, -1, -1):
        lo, hi = level_offset(level, v), level_offset(level + 1, v)
        probs[lo:hi] = tilt(logp_ref[lo:hi], q_vals, beta)
        if level > 0:  # reward-only state values become the parents' Q
            q_vals = (probs[lo:hi] * q_vals).sum(-1).reshape(-1, v)
    return probs


def state_visit_probs(problem, probs: Tensor) -> Tensor:
    """d(s) = sum_x p(x) P_pi(reach s | x) for every state, [S], under a probs table [S, V]."""
    enum = problem.enumerate()
    seq = torch.exp(torch.log(probs)[enum.states, enum.tokens].sum(-1)) * enum.prompt_prob  # [N]
    n, t = enum.states.shape
    visits = torch.zeros(probs.shape[0], dtype=probs.dtype)
    return visits.index_add(0, enum.states.reshape(-1), seq[:, None].expand(n, t).reshape(-1))
