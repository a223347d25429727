"""Token-loss reduction with an explicit denominator (STYLE rule 5)."""
from __future__ import annotations

import pytest
import torch

from tilt.reduction import MODES, masked_mean, reduce_tokens, reduction_denominator

# Two sequences: lengths 3 and 1; per-token losses l.
L = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode,expected", [
    # token-mean: (1+2+3+4) / 4 tokens = 10/4 = 2.5
    ("token-mean", 2.5),
    # seq-mean-token-mean: ((1+2+3)/3 + 4/1) / 2 seqs = (2 + 4) / 2 = 3.0
    ("seq-mean-token-mean", 3.0),
    # seq-mean-token-sum: (6 + 4) / 2 = 5.0
    ("seq-mean-token-sum", 5.0),
    # seq-mean-token-sum-norm with L_max = 4: 10 / (2 * 4) = 1.25
    ("seq-mean-token-sum-norm", 1.25),
])
def test_hand_computed_values(mode, expected):
    d = reduction_denominator(M, mode, max_len=4)
    assert reduce_tokens(L, M, mode=mode, denominator=d).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", MODES)
def test_k_micro_batches_equal_full_batch(mode):
    """Summing micro-batch reductions with the FULL batch's denominator equals one full reduction,
    for values and gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(8, 6, generator=g) > 0.3).double()
    m[:, 0] = 1
    d = reduction_denominator(m, mode, max_len=6)
    full = reduce_tokens(x ** 2, m, mode=mode, denominator=d)
    (gfull,) = torch.autograd.grad(full, x)
    parts = sum(reduce_tokens(x[i:i + 2] ** 2, m[i:i + 2], mode=mode, denominator=d) for i in range(0, 8, 2))
    (gparts,) = torch.autograd.grad(parts, x)
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(gparts, gfull)


@pytest.mark.parametrize("mode", MODES)
def test_padding_changes_nothing(mode):
    padded_l = torch.cat([L, torch.full((2, 3), 123.0)], 1)
    padded_m = torch.cat([M, torch.zeros(2, 3)], 1)
    a = reduce_tokens(L, M, mode=mode, denominator=reduction_denominator(M, mode, max_len=4))
    b = reduce_tokens(padded_l, padded_m, mode=mode, denominator=reduction_denominator(padded_m, mode, max_len=4))
    assert a.item() == pytest.approx(b.item())


def test_unknown_mode_lists_valid():
    with pytest.raises(ValueError, match="token-mean"):
        reduction_denominator(M, "mean-ish")


def test_masked_mean():
    # (1 + 2 + 3 + 4) / 4 = 2.5
    assert masked_mean(L, M).item() == pytest.approx(2.5)
