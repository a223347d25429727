"""E5 Q-Probe (arXiv:2402.14688): a linear probe on embeddings reweights k sampled completions.

Fit w by ridge regression of the reward on the embedding phi(x, y) (the paper's reward-modelling
objective); at inference draw k completions from pi_ref and return one with probability
∝ exp(w^T phi / beta). Its exact law for finite k is ``tilt.exact.resample_probs``; as k grows it
tends to pi_ref exp(w^T phi / beta) / Z.
"""
from __future__ import annotations

import torch
from torch import Tensor


def fit_probe(features: Tensor, rewards: Tensor, *, l2: float = 1e-3) -> Tensor:
    """Ridge regression w = (F^T F + l2 I)^-1 F^T r. features [M, H], rewards [M] -> w [H]."""
    if features.dim() != 2 or rewards.shape != features.shape[:1]:
        raise ValueError(f"fit_probe needs features [M, H] and rewards [M], got {tuple(features.shape)} "
                         f"and {tuple(rewards.shape)}")
    h = features.shape[1]
    gram = features.T @ features + l2 * torch.eye(h, dtype=features.dtype)  # [H, H]
    return torch.linalg.solve(gram, features.T @ rewards)  # [H]


def probe_select(scores: Tensor, *, beta: float, generator: torch.Generator | None = None) -> Tensor:
    """Index of the chosen candidate per row, drawn ∝ exp(score / beta). scores [B, k] -> [B]."""
    if not beta > 0:
        raise ValueError(f"Q-Probe beta must be > 0, got {beta!r}")
    return torch.multinomial(torch.softmax(scores / beta, -1), 1, generator=generator).squeeze(-1)


def pg_loss(scores: Tensor, rewards: Tensor, *, beta: float = 1.0) -> Tensor:
    """Q-Probe's policy-learning objective: minus the expected reward of the k-sample resampler.

    L = -(1/B) sum_b sum_i r_{b,i} softmax(s_b / beta)_i over B groups of k pi_ref samples (the
    importance-weighted policy gradient of arXiv:2402.14688 §4: the draws come from pi_ref, the
    softmax is the probability that the sampler keeps draw i). scores, rewards [B, k] -> scalar.
    """
    if scores.shape != rewards.shape or scores.dim() != 2:
        raise ValueError(f"pg_loss needs scores and rewards [B, k], got {tuple(scores.shape)} and "
                         f"{tuple(rewards.shape)}")
    return -(rewards * torch.softmax(scores / beta, -1)).sum(-1).mean()


def _adam_fit(features: Tensor, loss_of_scores, *, l2: float, epochs: int, lr: float) -> tuple[Tensor, Tensor]:
    """Full-batch Adam on a linear score phi w + b; returns (w [H], b [])."""
    w = torch.zeros(features.shape[-1], dtype=features.dtype, requires_grad=True)
    b = torch.zeros((), dtype=features.dtype, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        loss = loss_of_scores(features @ w + b) + l2 * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def fit_probe_objective(features: Tensor, rewards: Tensor, *, objective: str, beta: float = 1.0, l2: float = 1e-3,
                        epochs: int = 500, lr: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Fit the probe Q(x, y) = w^T phi + b with one of the paper's objectives; returns (w [H], b []).

    features [B, k, H] and rewards [B, k] (k pi_ref samples per prompt):
      "mse": ridge regression of r on [phi, 1] (reward modelling, closed form via ``fit_probe``);
      "ce":  logistic regression, BCE(sigmoid(Q), r) for rewards in [0, 1] (reward modelling);
      "pg":  ``pg_loss`` on the groups of k (direct policy learning; needs k >= 2).
    """
    if features.dim() != 3 or rewards.shape != features.shape[:2]:
        raise ValueError(f"probe fitting needs features [B, k, H] and rewards [B, k], got {tuple(features.shape)} "
                         f"and {tuple(rewards.shape)}")
    flat, r = features.reshape(-1, features.shape[-1]), rewards.reshape(-1)  # [B*k, H], [B*k]
    if objective == "mse":
        ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype)
        wb = fit_probe(torch.cat([flat, ones], 1), r, l2=l2)  # [H+1]
        return wb[:-1], wb[-1]
    if objective == "ce":
        if bool(((r < 0) | (r > 1)).any()):
            raise ValueError("probe objective 'ce' needs rewards in [0, 1]; use 'mse' for other rewards")
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return _adam_fit(flat, lambda s: bce(s, r), l2=l2, epochs=epochs, lr=lr)
    if objective == "pg":
        if features.shape[1] < 2:
            raise ValueError("probe objective 'pg' needs k >= 2 samples per prompt (it compares them)")
        shape = rewards.shape
        return _adam_fit(flat, lambda s: pg_loss(s.reshape(shape), rewards, beta=beta), l2=l2, epochs=epochs, lr=lr)
    raise ValueError(f"unknown probe objective {objective!r}; valid: mse, ce, pg")
