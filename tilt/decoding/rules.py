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


def dual_alpha_renormalize(probs: Tensor, support: Tensor, *, alpha: float, iters: int = 60) -> Tensor:
    """Dual alpha-Bregman renormalisation of ``probs`` onto a fixed support, [..., V] (alpha >= 1).

    argmin_{q in simplex, supp q = S} D_phi(p, q) (the arguments of the primal swapped), same
    alpha-entropy phi. On S, d/dq_i [phi(p_i) - phi(q_i) - phi'(q_i)(p_i - q_i)] = -phi''(q_i)(p_i - q_i),
    so with multiplier nu for sum q = 1 the KKT condition is (our derivation; arXiv:2505.19371 defines
    the dual decoder, its body was not available to us)
        phi''(q_i) (q_i - p_i) = nu,   i.e.   h_i(q) = q^(a-2) (q - p_i) = nu   on S.
    a = 1: (q_i - p_i) / q_i = nu, q ∝ p (plain top-k); a = 2: q_i = p_i + nu (Euclidean = primal);
    a = 3: q_i^2 - p_i q_i = nu. For a >= 1, h_i is increasing on [p_i, 1] (h' = q^(a-3)((a-1)q - (a-2)p_i)
    > 0) and sum_S p <= 1 needs nu >= 0, so each q_i(nu) is the unique root in [p_i, 1] (inner bisection)
    and nu in [0, 1] is found by outer bisection on sum q(nu) = 1. For a < 1 h_i is not monotone
    (it peaks at q = p_i (2-a)/(1-a)) and the KKT equation can have no root, so a < 1 is refused.
    Cost: iters^2 elementwise passes over [..., V] (``sparse_bregman`` passes only the top-k columns).
    """
    if alpha < 1:
        raise ValueError(f"dual Bregman decoding needs alpha >= 1 (its KKT equation has no root for some "
                         f"distributions when alpha < 1), got alpha={alpha!r}")
    p = probs.masked_fill(~support, 0.0)  # [..., V]

    def root(nu: Tensor) -> Tensor:  # q_i(nu) in [p_i, 1] with q^(a-2)(q - p) = nu, [..., V]
        lo, hi = p, torch.ones_like(p)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            low = mid ** (alpha - 2.0) * (mid - p) < nu
            lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
        return torch.where(support, 0.5 * (lo + hi), torch.zeros_like(p))

    lo = torch.zeros(probs.shape[:-1] + (1,), dtype=probs.dtype)  # sum q(0) = sum_S p <= 1
    hi = lo + 1.0  # q_i(1) = 1 for every i in S: sum = |S| >= 1
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        small = root(mid).sum(-1, keepdim=True) < 1.0
        lo, hi = torch.where(small, mid, lo), torch.where(small, hi, mid)
    q = root(0.5 * (lo + hi))
    return q / q.sum(-1, keepdim=True)


def bregman_divergence(q: Tensor, p: Tensor, *, alpha: float) -> Tensor:
    """Separable D_phi(q, p) = sum phi(q) - phi(p) - phi'(p)(q - p), alpha-entropy phi, [...].

    phi'(0) is its limit: -1 / (a (a - 1)) for a > 1 (so D_phi(p, 0) = sum p^a / (a (a - 1)) is finite),
    -inf for a <= 1 (clamped to 1e-300; only the primal D(q, p) with p > 0 is finite there).
    """
    if alpha == 1.0:
        phi = lambda x: torch.xlogy(x, x)  # noqa: E731
        dphi = lambda x: torch.log(x.clamp(min=1e-300)) + 1.0  # noqa: E731
    else:
        floor = 0.0 if alpha > 1 else 1e-300
        phi = lambda x: (x.clamp(min=0) ** alpha - x) / (alpha * (alpha - 1.0))  # noqa: E731
        dphi = lambda x: (alpha * x.clamp(min=floor) ** (alpha - 1.0) - 1.0) / (alpha * (alpha - 1.0))  # noqa: E731
    return (phi(q) - phi(p) - dphi(p) * (q - p)).sum(-1)


def sparse_bregman(probs: Tensor, k: Tensor, *, alpha: float, mode: str = "primal") -> tuple[Tensor, Tensor]:
    """The best q supported on each row's k[n] most likely tokens, and its divergence, ([N, V], [N]).

    primal: q = argmin D_phi(q, p), cost D_phi(q, p); dual: q = argmin D_phi(p, q), cost D_phi(p, q)
    (arXiv:2505.19371: the optimal support of size k is the top-k, "greedy"). ``k`` [N] integers in
    [1, V]; ties at the k-th rank are broken by argsort order. Only the W = max k leading columns are
    renormalised; the others contribute their dropped-token terms to the cost.
    """
    order = probs.argsort(-1, descending=True)  # [N, V]
    sorted_p = probs.gather(-1, order)  # [N, V] descending
    w = int(k.max())
    head, tail = sorted_p[:, :w], sorted_p[:, w:]  # [N, W], [N, V-W]
    support = torch.arange(w) < k[:, None]  # [N, W]
    renorm = alpha_renormalize if mode == "primal" else dual_alpha_renormalize
    q_head = renorm(head, support, alpha=alpha)  # [N, W]
    pairs = ((q_head, head), (torch.zeros_like(tail), tail))  # (q, p) on the head and on the tail
    cost = sum(bregman_divergence(*(qp if mode == "primal" else qp[::-1]), alpha=alpha) for qp in pairs)  # [N]
    return torch.zeros_like(probs).scatter(-1, order[:, :w], q_head), cost


def bregman_logp(logits: Tensor, *, alpha: float = 1.0, k: int | None = None, lam: float | None = None,
                 max_k: int = 64, mode: str = "primal", temperature: float = 1.0) -> Tensor:
    """Bregman decoder (arXiv:2505.19371): the best k-sparse q for D + lam * k, [N, V] log-probs.

    ``mode`` "primal" minimises D_alpha(q, p), "dual" D_alpha(p, q) (``dual_alpha_renormalize``).
    With ``k`` given that k is used (alpha = 1 is exactly top-k in both modes). With ``lam`` each row's
    k minimises C(k) = D(q_k) + lam * k over k = 1..min(max_k, V); the paper proves C discretely convex
    in k, so k is found by binary search for the first k with C(k + 1) - C(k) >= 0: 2 ceil(log2 max_k)
    renormalisations instead of max_k (tests/test_decoding_bregman.py checks it against a linear scan).
    The dual with lam needs alpha > 1: for alpha <= 1, D(p, q) is infinite once q drops a token.
    """
    if (k is None) == (lam is None):
        raise ValueError("decoder 'bregman' needs exactly one of k (fixed sparsity) or lam (adaptive k)")
    if alpha <= 0:
        raise ValueError(f"decode bregman alpha must be > 0, got {alpha!r}")
    if mode not in ("primal", "dual"):
        raise ValueError(f"decode bregman mode must be 'primal' or 'dual', got {mode!r}")
    probs = sample_logp(logits, temperature=temperature).exp()  # [N, V]
    n, v = probs.shape
    if k is not None:
        _check_k(k, v)
        return sparse_bregman(probs, torch.full((n,), k), alpha=alpha, mode=mode)[0].log()
    if lam < 0:
        raise ValueError(f"decode bregman lam must be >= 0, got {lam!r}")
    if mode == "dual" and alpha <= 1:
        raise ValueError(f"decode bregman mode 'dual' with lam needs alpha > 1 (D(p, q) is infinite for a "
                         f"sparse q when alpha <= 1), got alpha={alpha!r}")
    if not isinstance(max_k, int) or isinstance(max_k, bool) or max_k < 1:
        raise ValueError(f"decode bregman max_k must be a positive integer, got {max_k!r}")
    top = min(max_k, v)

    def cost(j: Tensor) -> Tensor:  # C(j) per row, [N]
        return sparse_bregman(probs, j, alpha=alpha, mode=mode)[1] + lam * j.to(probs.dtype)

    lo, hi = torch.ones(n, dtype=torch.long), torch.full((n,), top)  # [N] the optimum lies in [lo, hi]
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        rising = cost((mid + 1).clamp(max=top)) >= cost(mid)  # [N] C(mid+1) >= C(mid): optimum <= mid
        done = lo >= hi
        lo, hi = torch.where(done | rising, lo, mid + 1), torch.where(done | ~rising, hi, mid)
    return sparse_bregman(probs, lo, alpha=alpha, mode=mode)[0].log()


def guided_logp(logits: Tensor, *, values: Tensor, beta: float, top_k: int | None = None,
                rest: str = "drop") -> Tensor:
    """Value guidance: pi(a|s) ∝ pi_ref(a|s) exp(Q(s, a) / beta) on pi_ref's top-k tokens, [N, V].

    With Q = Q* (the KL-regularised optimal Q) and top_k = None this is exactly pi*(a|s)
    (soft Bellman, e.g. Eq. 3 of Q♯, arXiv:2502.20548). ``values`` [N, V] (only the top-k entries
    are read; others may hold anything finite). ``rest`` says what the tokens outside the top-k get:
    "drop" (probability 0: guidance and truncation in one) or "ref" (their pi_ref probability with
    Q = 0, i.e. no guidance offset: the Q♯ reference code's logits processor, which adds the offset
    to the top-k logits only; for rewards >= 0, Q = 0 is the least value a token can have).
    """
    _check_beta(beta)
    if values.shape != logits.shape:
        raise ValueError(f"guided decoding values {tuple(values.shape)} must match logits {tuple(logits.shape)}")
    if rest not in ("drop", "ref"):
        raise ValueError(f"guided decoding rest must be 'drop' or 'ref' (tokens outside the top-k), got {rest!r}")
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    if top_k is not None:
        kept = top_k_logp(logits, k=top_k)  # [N, V] -inf outside the top-k
        if rest == "drop":
            logp = kept
        else:
            values = values.masked_fill(torch.isinf(kept), 0.0)  # [N, V] Q = 0 outside the top-k
    return torch.log_softmax(logp + values / beta, dim=-1)
