"""The optional value head for GAE (catalogue C1, PPO): a linear map from hidden states to V(s_t).

The learner runs the policy with ``output_hidden_states=True``, feeds the last layer's states at
the completion positions to ``ValueHead`` and trains it with ``value_loss`` against the GAE
returns (``tilt.advantages.gae.gae_advantages_returns``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """V(s_t) = w^T h_t + b. Zero-initialised so the first values are 0 (no random baseline)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [..., H] -> values [...]."""
        return self.proj(hidden).squeeze(-1)


def value_loss(values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float | None = None,
               old_values: Tensor | None = None, denominator: float | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean squared value error, optionally clipped around the rollout-time values.

        l_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)
        loss = sum_t l_t m_t / denominator

    PPO's clipped value loss (arXiv:1707.06347 as implemented in verl
    ``compute_value_loss``, token-mean aggregation).

    Args:
        values: [N, T] current predictions (carry grad). returns: [N, T] targets (detached).
        mask: [N, T] 1 on completion tokens.
        clip_range: c; None disables clipping. old_values: [N, T] V_old, needed when clipping.
        denominator: normaliser from the FULL batch (tilt.reduction rule); defaults to mask.sum().
    Returns:
        (scalar loss, {"value/loss", "value/clip_frac", "value/error_mean"}).
    """
    m = mask.to(values.dtype)
    denom = float(denominator) if denominator is not None else max(float(m.sum()), 1.0)
    returns = returns.detach()
    err = (values - returns) ** 2  # [N, T]
    clip_frac = torch.zeros((), dtype=values.dtype)
    if clip_range is not None:
        if old_values is None:
            raise ValueError("value_loss with clip_range needs old_values")
        old = old_values.detach()
        clipped = torch.clamp(values, old - clip_range, old + clip_range)  # [N, T]
        err_clipped = (clipped - returns) ** 2  # [N, T]
        clip_frac = ((err_clipped > err).to(values.dtype) * m).sum() / max(float(m.sum()), 1.0)
        err = torch.maximum(err, err_clipped)
    loss = 0.5 * (err * m).sum() / denom
    error_mean = ((values - returns).detach() * m).sum() / max(float(m.sum()), 1.0)
    return loss, {"value/loss": loss.detach(), "value/clip_frac": clip_frac.detach(),
                  "value/error_mean": error_mean}
