"""A token tree: one prompt, ``depth`` tokens over a vocabulary of V, terminal rewards.

The state is the token prefix, transitions are deterministic, and the reward r(y) of a full
path y is paid at its last token. States are numbered level by level, each level in
lexicographic order: the prefix (a_0, ..., a_{d-1}) has index
offset(d) + sum_j a_j V^(d-1-j), with offset(d) = sum_{e<d} V^e (the root is 0). So the
reference policy is one table ``ref_logits`` [S, V] with S = (V^depth - 1) / (V - 1).

Token-level optimum of max E[r] - beta KL(pi || pi_ref) (soft Bellman backup):
    Q*(s, a) = r(s, a) + beta log E_{a' ~ pi_ref(.|s')} exp(Q*(s', a') / beta)
    V*(s)    = beta log E_{a ~ pi_ref(.|s)} exp(Q*(s, a) / beta)
    pi*(a|s) = pi_ref(a|s) exp((Q*(s, a) - V*(s)) / beta)
whose product over a path equals pi_ref(y) exp(r(y)/beta) / Z (soft Bellman equations, e.g. arXiv:2404.12358).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tilt.exact.enumeration import Enumeration


def level_offset(depth: int, vocab: int) -> int:
    """Index of the first state at tree level ``depth`` (number of states above it)."""
    return sum(vocab ** e for e in range(depth))


@dataclass
class TokenTree:
    """Terminal rewards ``rewards`` [V]*depth and reference logits per prefix [S, V]."""

    depth: int
    vocab: int
    rewards: Tensor  # [V] * depth, rewards[a_0, ..., a_{depth-1}]
    ref_logits: Tensor  # [S, V]

    def __post_init__(self) -> None:
        if tuple(self.rewards.shape) != (self.vocab,) * self.depth:
            raise ValueError(f"rewards must be {(self.vocab,) * self.depth}, got {tuple(self.rewards.shape)}")
        if tuple(self.ref_logits.shape) != (self.n_states, self.vocab):
            raise ValueError(f"ref_logits must be {(self.n_states, self.vocab)}, "
                             f"got {tuple(self.ref_logits.shape)}")

    @property
    def n_states(self) -> int:
        return level_offset(self.depth, self.vocab)

    def state_index(self, prefix: tuple[int, ...]) -> int:
        """Row of the [S, V] table for a token prefix."""
        number = 0
        for a in prefix:
            number = number * self.vocab + a
        return level_offset(len(prefix), self.vocab) + number

    def enumerate(self) -> Enumeration:
        """All completions (computed once and cached; the problem is treated as immutable)."""
        if getattr(self, "_enum", None) is None:
            self._enum = self._build_enumeration()
        return self._enum

    def _build_enumeration(self) -> Enumeration:
        """All V^depth paths in lexicographic order, T = depth."""
        v, d = self.vocab, self.depth
        paths = torch.arange(v ** d)  # [N]
        powers = v ** torch.arange(d - 1, -1, -1)  # [T]
        tokens = (paths[:, None] // powers) % v  # [N, T]
        prefix_number = paths[:, None] // (v * powers)  # [N, T] number of the prefix before t
        offsets = torch.tensor([level_offset(t, v) for t in range(d)])  # [T]
        n = paths.numel()
        return Enumeration(
            states=offsets + prefix_number,  # [N, T]
            tokens=tokens,
            group=torch.zeros(n, dtype=torch.long),
            prompt_prob=torch.ones(n, dtype=self.rewards.dtype),
            rewards=self.rewards.reshape(-1),  # [N], lexicographic = row-major
            n_prompts=1,
        )

    def soft_q(self, beta: float) -> Tensor:
        """Q*(s, a) for every state, [S, V], by backward induction from the leaves."""
        v, d = self.vocab, self.depth
        logp_ref = torch.log_softmax(self.ref_logits, -1)  # [S, V]
        q = torch.empty_like(self.ref_logits)  # [S, V]
        start = level_offset(d - 1, v)
        q[start:] = self.rewards.reshape(-1, v)  # [V^(d-1), V] terminal r(s, a)
        for level in range(d - 2, -1, -1):
            lo, hi = level_offset(level, v), level_offset(level + 1, v)
            child = q[hi:hi + v ** (level + 1)]  # [V^(level+1), V]
            v_child = beta * torch.logsumexp(logp_ref[hi:hi + v ** (level + 1)] + child / beta, -1)
            q[lo:hi] = v_child.reshape(-1, v)  # Q*(s, a) = 0 + V*(s·a)
        return q

    def optimal_policy(self, beta: float) -> Tensor:
        """pi*(a|s) = pi_ref(a|s) exp((Q*(s,a) - V*(s)) / beta), probs table [S, V]."""
        logp_ref = torch.log_softmax(self.ref_logits, -1)  # [S, V]
        q = self.soft_q(beta)  # [S, V]
        v_star = beta * torch.logsumexp(logp_ref + q / beta, -1, keepdim=True)  # [S, 1]
        return torch.exp(logp_ref + (q - v_star) / beta)

    def soft_value(self, beta: float) -> Tensor:
        """V*(root) = beta log E_{y ~ pi_ref} exp(r(y)/beta), shape [1]."""
        logp_ref = torch.log_softmax(self.ref_logits, -1)[:1]  # [1, V]
        return beta * torch.logsumexp(logp_ref + self.soft_q(beta)[:1] / beta, -1)


def make_tree(*, depth: int = 2, vocab: int = 3, seed: int = 0,
              dtype: torch.dtype = torch.float64) -> TokenTree:
    """A random tree: terminal rewards uniform in [0, 1], reference logits standard normal."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand((vocab,) * depth, generator=gen, dtype=dtype)
    ref_logits = torch.randn(level_offset(depth, vocab), vocab, generator=gen, dtype=dtype)
    return TokenTree(depth=depth, vocab=vocab, rewards=rewards, ref_logits=ref_logits)


def make_needle_tree(*, depth: int = 4, vocab: int = 3, seed: int = 0, bias: float = 2.0,
                     dtype: torch.dtype = torch.float64) -> TokenTree:
    """A sparse-reward tree whose reference avoids the answer (a "shortcut", as Q♯'s star graph).

    r(y) = 1 iff at least depth - 1 tokens of y are token vocab - 1; pi_ref's logits are N(0, 0.25)
    plus ``bias`` on token 0, so pi_ref rarely reaches reward (P_ref(r=1) ~ 0.01 at the defaults).
    """
    gen = torch.Generator().manual_seed(seed)
    paths = torch.arange(vocab ** depth)
    powers = vocab ** torch.arange(depth - 1, -1, -1)
    tokens = (paths[:, None] // powers) % vocab  # [Y, depth]
    rewards = ((tokens == vocab - 1).sum(-1) >= depth - 1).to(dtype).reshape((vocab,) * depth)
    logits = 0.5 * torch.randn(level_offset(depth, vocab), vocab, generator=gen, dtype=dtype)
    logits[:, 0] += bias
    return TokenTree(depth=depth, vocab=vocab, rewards=rewards, ref_logits=logits)
