"""E2 Q♯ (arXiv:2502.20548): the regularised Q* from the distribution of outcome reward under pi_ref.

In a deterministic MDP with terminal reward, Q*(s, a) = beta log E_{pi_ref}[exp(r / beta) | s, a]
(Q♯ Eq. 5/Thm 3.1), so Q* follows from the distribution Z(s, a) of r under pi_ref continuations:
learn Z by maximum likelihood (distributional RL, no TD bootstrapping), decode with
pi_ref exp(Q / beta), and collect more data by rolling in with the guided policy and rolling out
with pi_ref; the datasets of all rounds are aggregated (DAgger-like, Q♯ Algorithm 1).

Here: the pure Q-from-distribution maps, and the whole loop on a TokenTree with a tabular,
non-parametric (empirical) distribution per (s, a), used by tests and docs/qsharp.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def soft_q_from_atoms(atoms: Tensor, probs: Tensor, *, beta: float) -> Tensor:
    """Q = beta log sum_m probs_m exp(atoms_m / beta) over the last dim (a categorical Z), [...]."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    return beta * torch.logsumexp(probs.clamp(min=1e-300).log() + atoms / beta, dim=-1)


def soft_q_bernoulli(p_success: Tensor, *, beta: float) -> Tensor:
    """Q for a {0, 1} reward with P(r = 1) = p: beta log(1 - p + p e^(1/beta)), [...]."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    p = p_success.clamp(0.0, 1.0)
    return beta * torch.logaddexp((1 - p).clamp(min=1e-300).log(), p.clamp(min=1e-300).log() + 1.0 / beta)


@dataclass
class TabularZ:
    """Empirical (non-parametric, maximum-likelihood) reward distribution of every (s, a) of a tree.

    Holds the aggregated (state, action, reward) samples of all rounds; ``q_table`` turns them into
    Q. Unvisited pairs fall back to ``prior`` pseudo-observations of the mean observed reward.
    """

    n_states: int
    vocab: int
    beta: float
    prior: float = 1.0
    rewards: list = field(default_factory=list)  # (state, action, reward) triples, aggregated

    def add(self, states: Tensor, actions: Tensor, rewards: Tensor) -> None:
        self.rewards.append((states, actions, rewards))

    def q_table(self) -> Tensor:
        """Q(s, a) = beta log [(sum_i e^(r_i/beta) + c e^(r0/beta)) / (n + c)], [S, V]."""
        s = torch.cat([x[0] for x in self.rewards])  # [M]
        a = torch.cat([x[1] for x in self.rewards])
        r = torch.cat([x[2] for x in self.rewards]).to(torch.float64)
        shift = r.max()  # stable exponentials
        idx = s * self.vocab + a  # [M]
        size = self.n_states * self.vocab
        sums = torch.zeros(size, dtype=torch.float64).index_add(0, idx, torch.exp((r - shift) / self.beta))
        counts = torch.zeros(size, dtype=torch.float64).index_add(0, idx, torch.ones_like(r))
        r0 = r.mean()
        sums = sums + self.prior * torch.exp((r0 - shift) / self.beta)
        q = shift + self.beta * torch.log(sums / (counts + self.prior))
        return q.reshape(self.n_states, self.vocab)


def rollin_rollout(tree, guided: Tensor, n: int, gen: torch.Generator, *,
                   all_tokens: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """n samples (s_h, a_h, r): roll in with ``guided`` [S, V] to a uniform switch step h, then
    draw a_h and the rest of the sequence from pi_ref; r is the terminal reward. Returns three [n].
    ``all_tokens``: also every later (s_t, a_t, r), t > h (each is followed by pi_ref too; the Q♯
    reference code's use_all_ref_tokens), three [M] with M = sum of (depth - h)."""
    ref = torch.softmax(tree.ref_logits, -1)  # [S, V]
    v, d = tree.vocab, tree.depth
    h = torch.randint(0, d, (n,), generator=gen)  # [n]
    prefix = torch.zeros(n, dtype=torch.long)  # lexicographic number of the prefix
    states, tokens = [], []
    for t in range(d):
        state = sum(v ** e for e in range(t)) + prefix  # [n] row of the [S, V] table
        policy = torch.where((t < h)[:, None], guided[state], ref[state])  # [n, V]
        tok = torch.multinomial(policy, 1, generator=gen).squeeze(-1)  # [n]
        states.append(state)
        tokens.append(tok)
        prefix = prefix * v + tok
    r = tree.rewards.reshape(-1)[prefix]  # [n]
    s_all, a_all = torch.stack(states, 1), torch.stack(tokens, 1)  # [n, d]
    steps = torch.arange(d)[None]  # [1, d]
    keep = (steps >= h[:, None]) if all_tokens else (steps == h[:, None])  # [n, d]
    return s_all[keep], a_all[keep], r[:, None].expand(n, d)[keep]


def qsharp_exact(tree, *, beta: float, samples_per_round: int, rounds: int, seed: int = 0,
                 top_k: int | None = None, all_tokens: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Run Q♯ on a TokenTree; return (final guided probs table [S, V], the guided table after each round).
    ``all_tokens``: every pi_ref token of a roll-out is a sample (``rollin_rollout``)."""
    from tilt.decoding.rules import guided_logp

    gen = torch.Generator().manual_seed(seed)
    model = TabularZ(tree.n_states, tree.vocab, beta)
    guided = torch.softmax(tree.ref_logits, -1)  # round 0 rolls in with pi_ref
    history = []
    for _ in range(rounds):
        model.add(*rollin_rollout(tree, guided, samples_per_round, gen, all_tokens=all_tokens))
        guided = guided_logp(tree.ref_logits, values=model.q_table().to(tree.ref_logits.dtype), beta=beta,
                             top_k=top_k).exp()
        history.append(guided)
    return guided, history

