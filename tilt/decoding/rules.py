"""Next-token decoding rules: pure functions from logits [N, V] to the log-probabilities [N, V]
of the distribution the next token is drawn from (-inf outside its support).

Every rule takes keyword-only hyper-parameters and no state; ``tilt.decoding.DECODERS`` maps
config names to them. Value-guided rules (``guided_logp``) also take per-token values [N, V].
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_k(k: int, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"decode k must be a positive integer, got {k!r}")
    if k > vocab:
        raise ValueError(f"decode k={k} is larger than the vocabulary ({vocab} tokens); use k <= {vocab}")


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"decode beta must be > 0 (pi_ref * exp(Q / beta)), got {beta!r}")


def sample_logp(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Plain sampling: log softmax(logits / temperature), [N, V]."""
    if not temperature > 0:
        raise ValueError(f"decode temperature must be > 0 (use decoder 'greedy' for argmax), got {temperature!r}")
    return torch.log_softmax(logits / temperature, dim=-1)


def greedy_logp(logits: Tensor) -> Tensor:
    """Point mass on argmax(logits) (first index on ties): 0 there, -inf elsewhere, [N, V]."""
    top = logits.argmax(-1, keepdim=True)  # [N, 1]
    return torch.full_like(logits, -torch.inf).scatter(-1, top, 0.0)


def top_k_logp(logits: Tensor, *, k: int, temperature: float = 1.0) -> Tensor:
    """Keep the k most likely tokens and renormalise (Fan et al. 2018), [N, V]."""
    _check_k(k, logits.shape[-1])
    logp = sample_logp(logits, temperature=temperature)  # [N, V]
    kth = logp.topk(k, dim=-1).values[..., -1:]  # [N, 1]
    return torch.log_softmax(logp.masked_fill(logp < kth, -torch.inf), dim=-1)


def top_p_logp(logits: Tensor, *, p: float, temperature: float = 1.0) -> Tensor:
    """Nucleus: the smallest set of most likely tokens with mass >= p, renormalised (Holtzman et al. 2020).

    Same rule as ``tilt.rollout._pick``: a token is dropped when the mass before it already exceeds p.
    """
    if not 0 < p <= 1:
        raise ValueError(f"decode top_p p must be in (0, 1], got {p!r}")
    logp = sample_logp(logits, temperature=temperature)  # [N, V]
    sorted_lp, order = logp.sort(-1, descending=True)  # [N, V]
    probs = sorted_lp.exp()
    drop_sorted = probs.cumsum(-1) - probs > p  # [N, V]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, -torch.inf), dim=-1)


def min_p_logp(logits: Tensor, *, p: float, temperature: float = 1.0) -> Tensor:
    """Min-p: keep tokens with prob >= p * max prob, renormalised (Nguyen et al. 2024, arXiv:2407.01082)."""
    if not 0 <= p <= 1:
        raise ValueError(f"decode min_p p must be in [0, 1], got {p!r}")
    logp = sample_logp(logits, temperature=temperature)  # [N, V]
    floor = logp.max(-1, keepdim=True).values + torch.log(torch.tensor(p, dtype=logp.dtype))  # [N, 1]
    return torch.log_softmax(logp.masked_fill(logp < floor, -torch.inf), dim=-1)


def excluded_logp(logits: Tensor, *, banned: list[int]) -> Tensor:
    """Constrained decoding, (G)I-DLE style: the KL(q || p)-closest q with no mass on ``banned``.

    argmin_q KL(q || p) s.t. q(banned) = 0 is p restricted to the allowed tokens and renormalised
    (stationarity: log q = log p + const on the support). This is what the (G)I-DLE abstract
    describes; its generalised variants were not available to us (see docs/methods.md E7).
    """
    v = logits.shape[-1]
    bad = [b for b in banned if not 0 <= int(b) < v]
    if bad:
        raise ValueError(f"decode banned token ids {bad} are outside the vocabulary [0, {v})")
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    out = logp.index_fill(-1, torch.tensor([int(b) for b in banned], dtype=torch.long), -torch.inf)
    if torch.isinf(out).all(-1).any():
        raise ValueError("decode banned every token of the vocabulary")
    return torch.log_softmax(out, dim=-1)


def alpha_renormalize(probs: Tensor, support: Tensor, *, alpha: float, iters: int = 100) -> Tensor:
    """Primal alpha-Bregman renormalisation of ``probs`` onto a fixed support, [..., V].

    argmin_{q in simplex, supp q = S} D_phi(q, p) with phi(x) = sum (x^a - x) / (a (a - 1)) (alpha-entropy;
    a -> 1 is x log x). Stationarity phi'(q_i) = phi'(p_i) + nu gives
        q_i = (p_i^(a-1) + nu)^(1/(a-1)) on S       (a != 1),    q_i = p_i e^nu (a = 1, plain top-k),
    with nu found by bisection so that sum q = 1 (our derivation from the primal objective of
    "Foundations of Top-k Decoding", arXiv:2505.19371, Sec. 3).
    """
    p = probs.masked_fill(~support, 0.0)  # [..., V]
    if alpha == 1.0:
        return p / p.sum(-1, keepdim=True)
    a1 = alpha - 1.0
    base = torch.where(support, probs.clamp(min=1e-300) ** a1, torch.ones_like(probs))  # [..., V]

    def renorm(nu: Tensor) -> Tensor:  # q(nu) on S, 0 off S, [..., V]
        inner = (base + nu).clamp(min=1e-300)
        return torch.where(support, inner ** (1.0 / a1), torch.zeros_like(inner))

    # a > 1: sum q increases with nu, bracket [0, hi]; a < 1: it decreases, bracket (-min_S base, 0].
    zero = torch.zeros(probs.shape[:-1] + (1,), dtype=probs.dtype)
    if a1 > 0:
        lo, hi = zero, zero + 1.0
        for _ in range(200):
            hi = torch.where(renorm(hi).sum(-1, keepdim=True) < 1.0, 2.0 * hi, hi)
    else:
        lo, hi = -base.masked_fill(~support, torch.inf).min(-1, keepdim=True).values, zero
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        small = renorm(mid).sum(-1, keepdim=True) < 1.0  # need more mass
        if a1 > 0:
            lo, hi = torch.where(small, mid, lo), torch.where(small, hi, mid)
        else:
            lo, hi = torch.where(small, lo, mid), torch.where(small, mid, hi)
    q = renorm(0.5 * (lo + hi))
    return q / q.sum(-1, keepdim=True)


def bregman_divergence(q: Tensor, p: Tensor, *, alpha: float) -> Tensor:
    """Separable D_phi(q, p) = sum phi(q) - phi(p) - phi'(p)(q - p), alpha-entropy phi, [...]."""
    if alpha == 1.0:
        phi = lambda x: torch.xlogy(x, x)  # noqa: E731
        dphi = lambda x: torch.log(x.clamp(min=1e-300)) + 1.0  # noqa: E731
    else:
        phi = lambda x: (x.clamp(min=0) ** alpha - x) / (alpha * (alpha - 1.0))  # noqa: E731
        dphi = lambda x: (alpha * x.clamp(min=1e-300) ** (alpha - 1.0) - 1.0) / (alpha * (alpha - 1.0))  # noqa: E731
    return (phi(q) - phi(p) - dphi(p) * (q - p)).sum(-1)


def bregman_logp(logits: Tensor, *, alpha: float = 1.0, k: int | None = None, lam: float | None = None,
                 max_k: int = 64, temperature: float = 1.0) -> Tensor:
    """Primal Bregman decoder (arXiv:2505.19371): the best k-sparse q for D_alpha(q, p) + lam * k.

    The optimal support of size k is the k most likely tokens (the paper's greedy result); with
    ``k`` given that k is used (alpha = 1 is exactly top-k), with ``lam`` the k minimising
    D_alpha(q_k, p) + lam * k is chosen per row by scanning k = 1..min(max_k, V) (the scan costs
    max_k renormalisations of [N, V]). Returns [N, V] log-probs.
    """
    if (k is None) == (lam is None):
        raise ValueError("decoder 'bregman' needs exactly one of k (fixed sparsity) or lam (adaptive k)")
    if alpha <= 0:
        raise ValueError(f"decode bregman alpha must be > 0, got {alpha!r}")
    probs = sample_logp(logits, temperature=temperature).exp()  # [N, V]
    v = probs.shape[-1]
    order = probs.argsort(-1, descending=True)  # [N, V]
    rank = torch.empty_like(order).scatter(-1, order, torch.arange(v).expand_as(order))  # [N, V]
    if k is not None:
        _check_k(k, v)
        return alpha_renormalize(probs, rank < k, alpha=alpha).log()
    if lam < 0:
        raise ValueError(f"decode bregman lam must be >= 0, got {lam!r}")
    top = min(max_k, v)
    candidates = torch.stack([alpha_renormalize(probs, rank < j, alpha=alpha) for j in range(1, top + 1)])  # [K, N, V]
    cost = bregman_divergence(candidates, probs[None], alpha=alpha)  # [K, N]
    cost = cost + lam * torch.arange(1, top + 1, dtype=probs.dtype)[:, None]
    best = cost.argmin(0)  # [N]
    return candidates[best, torch.arange(probs.shape[0])].log()


def guided_logp(logits: Tensor, *, values: Tensor, beta: float, top_k: int | None = None) -> Tensor:
    """Value guidance: pi(a|s) ∝ pi_ref(a|s) exp(Q(s, a) / beta) over pi_ref's top-k tokens, [N, V].

    With Q = Q* (the KL-regularised optimal Q) and top_k = None this is exactly pi*(a|s)
    (soft Bellman, e.g. Eq. 3 of Q♯, arXiv:2502.20548). ``values`` [N, V] (only the top-k entries
    are read; others may hold anything finite).
    """
    _check_beta(beta)
    if values.shape != logits.shape:
        raise ValueError(f"guided decoding values {tuple(values.shape)} must match logits {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    if top_k is not None:
        logp = top_k_logp(logits, k=top_k)  # [N, V] -inf outside the top-k
    return torch.log_softmax(logp + values / beta, dim=-1)
