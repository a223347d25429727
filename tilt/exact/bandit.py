"""A contextual bandit small enough to solve exactly: X prompts, K one-token answers.

States are prompts (S = X), actions are answers (V = K), T = 1. The tilted optimum of
max E[r] - beta * KL(pi || pi_ref) is pi*(a|x) = pi_ref(a|x) exp(r(x,a)/beta) / Z(x)
(e.g. Eq. 4, arXiv:2305.18290; METHODS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tilt.exact.enumeration import Enumeration


@dataclass
class Bandit:
    """Rewards r(x, a) and reference logits; prompts drawn with ``prompt_probs`` (uniform)."""

    rewards: Tensor  # [X, K]
    ref_logits: Tensor  # [X, K] (this is the [S, V] reference table)
    prompt_probs: Optional[Tensor] = None  # [X]

    def __post_init__(self) -> None:
        if self.rewards.shape != self.ref_logits.shape or self.rewards.dim() != 2:
            raise ValueError(f"rewards {tuple(self.rewards.shape)} and ref_logits "
                             f"{tuple(self.ref_logits.shape)} must both be [X, K]")
        if self.prompt_probs is None:
            x = self.rewards.shape[0]
            self.prompt_probs = torch.full((x,), 1.0 / x, dtype=self.rewards.dtype)

    @property
    def n_states(self) -> int:
        return self.rewards.shape[0]

    @property
    def vocab(self) -> int:
        return self.rewards.shape[1]

    def enumerate(self) -> Enumeration:
        """All completions (computed once and cached; the problem is treated as immutable)."""
        if getattr(self, "_enum", None) is None:
            self._enum = self._build_enumeration()
        return self._enum

    def _build_enumeration(self) -> Enumeration:
        """All X*K (x, a) pairs, x-major, each a one-token completion."""
        x, k = self.rewards.shape
        group = torch.arange(x).repeat_interleave(k)  # [N]
        tokens = torch.arange(k).repeat(x)  # [N]
        return Enumeration(
            states=group[:, None],  # [N, 1]
            tokens=tokens[:, None],  # [N, 1]
            group=group,
            prompt_prob=self.prompt_probs[group],  # [N]
            rewards=self.rewards.reshape(-1),  # [N]
            n_prompts=x,
        )

    def optimal_policy(self, beta: float) -> Tensor:
        """pi*(a|x) = pi_ref(a|x) exp(r(x,a)/beta) / Z(x), as a probs table [X, K]."""
        return torch.softmax(torch.log_softmax(self.ref_logits, -1) + self.rewards / beta, dim=-1)

    def soft_value(self, beta: float) -> Tensor:
        """V*(x) = beta * log E_{a ~ pi_ref(.|x)} exp(r(x,a)/beta), [X]."""
        logp_ref = torch.log_softmax(self.ref_logits, -1)  # [X, K]
        return beta * torch.logsumexp(logp_ref + self.rewards / beta, dim=-1)


def make_bandit(*, n_prompts: int = 3, n_answers: int = 5, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> Bandit:
    """A random bandit: rewards uniform in [0, 1], reference logits standard normal."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(n_prompts, n_answers, generator=gen, dtype=dtype)  # [X, K]
    ref_logits = torch.randn(n_prompts, n_answers, generator=gen, dtype=dtype)  # [X, K]
    return Bandit(rewards=rewards, ref_logits=ref_logits)
