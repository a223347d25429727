"""Exact sampling distributions of decoders on a TokenTree, to compare with pi* (catalogue E1-E7).

A token-level decoder applied at every state turns the reference table into a probs table
[S, V]; ``sequence_probs`` then gives its distribution over all V^depth sequences. Sequence-level
selectors (best-of-n, resampling from k candidates) have closed forms over a finite set of
sequences with probabilities p [Y] and rewards or scores [Y].
"""
from __future__ import annotations

import math
from itertools import combinations_with_replacement
from typing import Callable, Optional

import torch
from torch import Tensor

from tilt.exact.enumeration import sequence_probs
from tilt.exact.tree import TokenTree, level_offset


def decoded_table(tree: TokenTree, decoder: Callable[..., Tensor], *, values: Optional[Tensor] = None,
                  **kwargs) -> Tensor:
    """Probs table [S, V] of a token-level decoder (a ``DECODERS`` fn) run on the reference logits."""
    return decoder(tree.ref_logits, values=values, **kwargs).exp()


def decoded_sequences(tree: TokenTree, decoder: Callable[..., Tensor], **kwargs) -> Tensor:
    """The decoder's distribution over all sequences, [1, Y] (lexicographic)."""
    return sequence_probs(tree, decoded_table(tree, decoder, **kwargs))


def future_return_q(tree: TokenTree, policy: Tensor, *, beta: float, kl_correction: bool = True) -> Tensor:
    """Q(s, a) = E_{policy}[ r(y) - c beta sum_{t' > t} log(policy / pi_ref)(y_t' | s_t') | s, a ], [S, V].

    c = 1 (``kl_correction``): the KL-regularised return of ``policy``; with policy = pi* this is
    exactly Q* (soft Bellman). c = 0: the plain expected reward E_policy[r | s, a], which Transfer Q*
    (arXiv:2405.20495, Q* from a baseline aligned model) and controlled decoding (arXiv:2310.17022,
    prefix scorer under pi_ref) use. ``policy`` is a probs table [S, V].
    """
    v, d = tree.vocab, tree.depth
    logp_ref = torch.log_softmax(tree.ref_logits, -1)  # [S, V]
    penalty = (policy.clamp(min=1e-300).log() - logp_ref) if kl_correction else torch.zeros_like(logp_ref)
    q = torch.empty_like(tree.ref_logits)  # [S, V]
    start = level_offset(d - 1, v)
    q[start:] = tree.rewards.reshape(-1, v)  # [V^(d-1), V] terminal rewards
    for level in range(d - 2, -1, -1):
        lo, hi = level_offset(level, v), level_offset(level + 1, v)
        rows = slice(hi, hi + v ** (level + 1))  # children states, [V^(level+1)]
        w = (policy[rows] * (q[rows] - beta * penalty[rows])).sum(-1)  # [V^(level+1)] value of each child
        q[lo:hi] = w.reshape(-1, v)
    return q


def indirect_transfer_q(tree: TokenTree, baseline: Tensor, *, beta: float, kl_correction: bool = True) -> Tensor:
    """Transfer Q*'s indirect transfer (arXiv:2405.20495 Sec. 3.2): Q for the target reward r from roll-outs
    of a baseline rho_BL aligned to ANOTHER reward r_BL, [S, V]. ``baseline`` is rho_BL's probs table [S, V].

    rho_BL ∝ pi_ref exp(r_BL / beta_BL) (closed form) gives its implicit reward of a continuation tau
    of (s, a): r_BL(tau) / beta_BL = log rho_BL(tau | s, a) - log pi_ref(tau | s, a) + const(s, a); so
    the target's continuation law is rho_BL reweighted,
        pi*(tau | s, a) = rho_BL(tau | s, a) w(tau) / E_rho_BL[w],  w = exp(r(tau) / beta) pi_ref(tau) / rho_BL(tau),
    and only rho_BL's own log-ratio is needed, never r_BL or beta_BL. Returned:
        c = 1 (``kl_correction``): Q(s, a) = beta log E_{tau ~ rho_BL}[w(tau)]  (= Q*, the KL-regularised return);
        c = 0: Q(s, a) = E_rho_BL[w r] / E_rho_BL[w] = E_{pi*}[r | s, a]  (the paper's plain target return).
    Computed by backward induction over the tree (the expectation a sampler of rho_BL estimates).
    """
    v, d = tree.vocab, tree.depth
    logp_ref = torch.log_softmax(tree.ref_logits, -1)  # [S, V]
    log_ratio = logp_ref - baseline.clamp(min=1e-300).log()  # [S, V] log pi_ref / rho_BL per token
    r = tree.rewards.reshape(-1, v)  # [V^(d-1), V]
    log_w = torch.empty_like(tree.ref_logits)  # [S, V] log E_rho_BL[w | s, a]
    wr = torch.empty_like(tree.ref_logits)  # [S, V] E_rho_BL[w r | s, a] / E_rho_BL[w | s, a]
    start = level_offset(d - 1, v)
    log_w[start:], wr[start:] = r / beta, r  # terminal: w = exp(r / beta)
    for level in range(d - 2, -1, -1):
        lo, hi = level_offset(level, v), level_offset(level + 1, v)
        rows = slice(hi, hi + v ** (level + 1))  # children states, [V^(level+1)]
        # E_{a'~rho_BL}[(pi_ref / rho_BL)(a'|s') W(s', a')] in log space, [V^(level+1)]
        terms = baseline[rows].clamp(min=1e-300).log() + log_ratio[rows] + log_w[rows]  # [V^(level+1), V]
        log_w[lo:hi] = torch.logsumexp(terms, -1).reshape(-1, v)
        wr[lo:hi] = (torch.softmax(terms, -1) * wr[rows]).sum(-1).reshape(-1, v)  # self-normalised mean of r
    return beta * log_w if kl_correction else wr


def blockwise_sequences(tree: TokenTree, q: Tensor, *, beta: float, block: int) -> Tensor:
    """Blockwise controlled decoding with every block enumerated, [1, Y].

    From a state s at position t0, the next block b = y_{t0:t1} (t1 = min(t0 + block, depth)) is drawn
    with pi(b | s) ∝ pi_ref(b | s) exp(V(s·b) / beta), where the prefix score V(s·b) = Q(s_{t1-1}, y_{t1-1})
    (the last step's Q; the terminal reward when t1 = depth). With Q = Q* this is pi* (multi-step soft
    Bellman). Sampling K candidate blocks and resampling is ``resample_probs`` over the blocks.
    """
    if block < 1:
        raise ValueError(f"block length must be >= 1, got {block}")
    enum = tree.enumerate()
    v, d = tree.vocab, tree.depth
    logp_ref = torch.log_softmax(tree.ref_logits, -1)[enum.states, enum.tokens]  # [Y, T]
    paths = torch.arange(v ** d)  # [Y]
    logp = torch.zeros(v ** d, dtype=q.dtype)  # [Y]
    for t0 in range(0, d, block):
        t1 = min(t0 + block, d)
        score = logp_ref[:, t0:t1].sum(-1) + q[enum.states[:, t1 - 1], enum.tokens[:, t1 - 1]] / beta  # [Y]
        key0, key1 = paths // v ** (d - t0), paths // v ** (d - t1)  # prefix before / after the block
        first = torch.ones(v ** d, dtype=torch.bool)  # one row per distinct block (duplicates share score)
        first[1:] = key1[1:] != key1[:-1]
        norm = torch.full((int(key0.max()) + 1,), -torch.inf, dtype=q.dtype)
        norm = norm.scatter_reduce(0, key0[first], score[first], reduce="amax")  # stable logsumexp
        total = torch.zeros_like(norm).index_add(0, key0[first], (score[first] - norm[key0[first]]).exp())
        logp = logp + score - (norm + total.log())[key0]
    return logp.exp()[None]


def blockwise_k_sequences(tree: TokenTree, q: Tensor, *, block: int, k: int, beta: Optional[float] = None) -> Tensor:
    """Blockwise CD with K sampled blocks per step (``tilt.decoding.blockwise``), its exact law [1, Y].

    From each prefix the K candidate blocks are iid draws from pi_ref(b | s), scored V(s·b) as in
    ``blockwise_sequences``; the kept block follows ``best_of_n_probs`` (beta None: argmax, the
    paper's rule) or ``resample_probs`` (drawn ∝ exp(V / beta)). K = 1 is pi_ref; with beta and
    K -> infinity it tends to ``blockwise_sequences``.
    """
    if block < 1 or k < 1:
        raise ValueError(f"blockwise CD needs block >= 1 and k >= 1, got block={block}, k={k}")
    enum = tree.enumerate()
    v, d = tree.vocab, tree.depth
    logp_ref = torch.log_softmax(tree.ref_logits, -1)[enum.states, enum.tokens]  # [Y, T]
    paths = torch.arange(v ** d)  # [Y]
    logp = torch.zeros(v ** d, dtype=q.dtype)  # [Y]
    for t0 in range(0, d, block):
        t1 = min(t0 + block, d)
        key1 = paths // v ** (d - t1)  # [Y] prefix after the block
        for start in range(0, v ** d, v ** (d - t0)):  # the rows sharing one prefix before the block (contiguous)
            rows = torch.arange(start, start + v ** (d - t0))
            firsts = rows[:: v ** (d - t1)]  # one row per distinct block, in block order [v^(t1-t0)]
            p = logp_ref[firsts, t0:t1].sum(-1).exp()  # pi_ref(b | s)
            s = q[enum.states[firsts, t1 - 1], enum.tokens[firsts, t1 - 1]]  # V(s·b)
            law = best_of_n_probs(p, s, k) if beta is None else resample_probs(p, s, beta=beta, k=k)
            logp[rows] += law.clamp(min=1e-300).log()[key1[rows] - key1[start]]
    return logp.exp()[None]


def best_of_n_probs(p: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Best-of-n over n iid draws from p [Y] (ties broken toward the first draw), closed form [Y].

    With F(rho) = P(r <= rho): P(max level = rho) = F(rho)^n - F(rho^-)^n, shared within the level in
    proportion to p (each tied draw is p restricted to the level). E.g. Beirami et al., arXiv:2401.01879.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    levels, inverse = torch.unique(rewards, return_inverse=True)  # ascending levels [L], [Y]
    mass = torch.zeros(levels.numel(), dtype=p.dtype).index_add(0, inverse, p)  # [L]
    upper = mass.cumsum(0)  # F(rho), [L]
    lower = upper - mass  # F(rho^-)
    level_prob = upper ** n - lower ** n  # [L]
    return torch.where(mass[inverse] > 0, p / mass[inverse].clamp(min=1e-300), 0.0) * level_prob[inverse]


def win_rate(p: Tensor, q: Tensor, rewards: Tensor) -> Tensor:
    """P(r(Y) > r(Z)) + 0.5 P(r(Y) = r(Z)), Y ~ p [..., Y], Z ~ q [Y] independent: the win rate with
    half ties (InfAlign, arXiv:2412.19792 Sec. 2). With p one-hot at y it is y's calibrated reward
    under q. Returns [...]."""
    beats = (rewards[:, None] > rewards[None, :]).to(p.dtype) + 0.5 * (rewards[:, None] == rewards[None, :]).to(p.dtype)
    return (p @ beats) @ q  # [...]


def kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) over the last dim (0 log 0 = 0)."""
    return torch.where(p > 0, p * (p.clamp(min=1e-300).log() - q.clamp(min=1e-300).log()), 0.0).sum(-1)


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || pi_ref) <= log n - (n - 1) / n (equality for continuous rewards; arXiv:2401.01879)."""
    return math.log(n) - (n - 1) / n


def resample_probs(p: Tensor, scores: Tensor, *, beta: float, k: int) -> Tensor:
    """Draw k iid candidates from p [Y], pick one with prob ∝ exp(score / beta): its exact law [Y].

    Q-Probe's sampler (arXiv:2402.14688) and blockwise CD with K sampled blocks. Summing over the
    multiset of draws, counts c with sum c = k:
        P(y) = sum_c Multinomial(c; k, p) * c_y w_y / sum_z c_z w_z,   w = exp(score / beta).
    As k -> infinity it tends to p w / sum p w (the tilted distribution). Cost C(Y + k - 1, k).
    """
    if not beta > 0:
        raise ValueError(f"resampling beta must be > 0, got {beta!r}")
    y = p.numel()
    w = torch.exp((scores - scores.max()) / beta)  # [Y] (shift cancels in the ratio)
    out = torch.zeros_like(p)
    log_fact_k = math.lgamma(k + 1)
    for draw in combinations_with_replacement(range(y), k):
        counts = torch.bincount(torch.tensor(draw), minlength=y).to(p.dtype)  # [Y]
        log_multi = log_fact_k - torch.lgamma(counts + 1).sum() + (counts * p.clamp(min=1e-300).log()).sum()
        out = out + log_multi.exp() * counts * w / (counts * w).sum()
    return out
