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
