"""Helpers shared by the loss tests."""
from __future__ import annotations

import torch

from tilt.kl import categorical_kl
from tilt.losses import LOSSES
from tilt.reduction import reduce_tokens, reduction_denominator

# Offline fixed-point problems shared by TOPR, NSR, PACS and NFT tests: 2 prompts x 5 answers.
REF = torch.tensor([[0.3, -0.5, 1.0, 0.2, -1.2], [1.1, 0.4, -0.3, -0.8, 0.0]], dtype=torch.float64)
CORRECT = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)


def reduced_loss(name, inp, **hypers):
    """The registered loss ``name`` on ``inp``, reduced with its declared reduction over the batch."""
    entry = LOSSES.entry(name)
    per_token, metrics = entry.fn(inp, **hypers)
    mode = entry.meta["reduction"]
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=reduction_denominator(inp.mask, mode)), metrics


def ref_given_correct():
    """pi_ref restricted to the correct answers, renormalised."""
    p = torch.softmax(REF, -1) * CORRECT
    return p / p.sum(-1, keepdim=True)


def with_exact_reverse_kl(name, beta):
    """Loss ``name`` + beta * KL(pi(.|s) || pi_ref(.|s)) from the full logits, as the learner adds it."""
    fn = LOSSES.get(name)

    def call(inp, **kw):
        per_token, _ = fn(inp, **kw)
        return per_token + beta * categorical_kl(inp.logits, inp.ref_logits)

    return call
