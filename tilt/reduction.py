"""Token-loss reduction, with the denominator passed in explicitly.

This is where TRL, torchtune and verl each had silent scaling bugs (TRL PR 6024): when a
batch is split into micro-batches, the normaliser must be the one of the *full* batch, or
k accumulated micro-batches stop equalling one full batch. So the learner computes the
denominator once from the full batch (``reduction_denominator``) and every micro-batch
divides by that same number (``reduce_tokens``).

Modes (names follow verl's ``loss_agg_mode``):
  token-mean            sum_{i,t} l_it m_it / sum_{i,t} m_it                (DAPO, verl default)
  seq-mean-token-mean   (1/N) sum_i [ sum_t l_it m_it / sum_t m_it ]        (GRPO as in the paper)
  seq-mean-token-sum    (1/N) sum_i sum_t l_it m_it                          (sequence-level losses)
  seq-mean-token-sum-norm  sum_{i,t} l_it m_it / (N * L_max)                 (Dr. GRPO)
"""
from __future__ import annotations

import torch
from torch import Tensor

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def reduction_denominator(mask: Tensor, mode: str, *, max_len: int | None = None) -> float:
    """The normaliser of ``mode`` over the FULL batch.

    Args:
        mask: [N, T] completion mask of the whole batch (all micro-batches together).
        mode: one of ``MODES``.
        max_len: L_max for ``seq-mean-token-sum-norm`` (Dr. GRPO uses the generation budget);
            defaults to T.
    Returns:
        A positive float: token count, sequence count, or N * L_max.
    """
    if mode == "token-mean":
        return max(float(mask.sum()), 1.0)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float(max(mask.shape[0], 1))
    if mode == "seq-mean-token-sum-norm":
        return float(max(mask.shape[0], 1) * (max_len if max_len is not None else mask.shape[1]))
    raise ValueError(f"unknown reduction mode {mode!r}; valid modes: {', '.join(MODES)}")


def reduce_tokens(per_token: Tensor, mask: Tensor, *, mode: str, denominator: float) -> Tensor:
    """Reduce a per-token loss [N, T] to a scalar, dividing by an explicit ``denominator``.

    The per-sequence length normalisation of ``seq-mean-token-mean`` is local to each
    sequence (its own token count), so it is the same in a micro-batch and in the full batch.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask  # [N, T]
    if mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        return masked.sum() / denominator
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [N]
        return per_seq.sum() / denominator
    raise ValueError(f"unknown reduction mode {mode!r}; valid modes: {', '.join(MODES)}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 if the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
