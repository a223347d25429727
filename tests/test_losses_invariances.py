"""Invariances every registered policy loss (catalogue A2-A6 and B1-B10) must satisfy.

For each registered loss (with its declared reduction): trailing padding with garbage values
changes neither the reduced loss nor its gradient; masked positions in the middle of a
sequence (e.g. tool output) give the same result as the batch holding only the selected
tokens; gradients are finite and exactly zero on masked positions; and
torch.autograd.gradcheck passes in float64 (inputs chosen away from clipping kinks).
"""
import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.providers import INTRINSIC, PROVIDERS
from tilt.reduction import reduce_tokens, reduction_denominator

D = torch.float64
# Every registered loss (names registered by tests themselves start with "test_").
OURS = [n for n in LOSSES.names() if not n.startswith("test_")]
# Surrogates whose value is not the function they differentiate: REINFORCE-style RPG forms weight
# log-probs by a detached coefficient, and AKL's head/tail mixing weights are detached. Their
# gradients are checked against the fully differentiable forms in tests/test_rpg.py and
# tests/test_regularizers.py; here they get the padding/masking/finite-gradient checks only.
STOP_GRADIENT_SURROGATES = {"rpg_rf_fkl", "rpg_rf_ufkl", "rpg_rf_rkl", "rpg_rf_urkl", "akl_distill",
                            "cispo", "vespo"}  # CISPO / VESPO: detached importance weights (tests/test_losses_peers.py)
N, T, V = 4, 3, 4
LENGTHS = [3, 2, 3, 1]


def _data(seed: int = 0) -> dict:
    """Raw tensors of a batch: 4 sequences in 2 groups, right-padded to T = 3."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in LENGTHS], dtype=D)  # [N, T]
    return dict(
        logits=torch.randn(N, T, V, generator=g, dtype=D),
        tokens=torch.randint(0, V, (N, T), generator=g),
        old_offset=0.05 + 0.1 * torch.rand(N, T, generator=g, dtype=D),  # ratios in [0.86, 0.95]
        adv=torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=D)[:, None].expand(N, T).clone(),
        mask=mask,
        ref_logits=torch.randn(N, T, V, generator=g, dtype=D),
        teacher_logits=torch.randn(N, T, V, generator=g, dtype=D),
        prev_offset=0.2 * torch.randn(N, T, generator=g, dtype=D),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D),
        group_index=torch.tensor([0, 0, 1, 1]),
        baseline_v=torch.tensor([0.3, 0.3, 0.6, 0.6], dtype=D),
    )


def _garbage(n_cols: int, seed: int = 1) -> dict:
    """Values for masked-out positions: large, wrong, finite."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        logits=40.0 * torch.randn(N, n_cols, V, generator=g, dtype=D),
        tokens=torch.randint(0, V, (N, n_cols), generator=g),
        old_offset=torch.full((N, n_cols), -30.0, dtype=D),
        adv=torch.full((N, n_cols), 1e3, dtype=D),
        mask=torch.zeros(N, n_cols, dtype=D),
        ref_logits=-25.0 * torch.ones(N, n_cols, V, dtype=D),
        teacher_logits=30.0 * torch.randn(N, n_cols, V, generator=g, dtype=D),
        prev_offset=torch.full((N, n_cols), 50.0, dtype=D),
    )


def _inp(d: dict, logits: torch.Tensor) -> PolicyLossInput:
    """PolicyLossInput whose logp, entropy and logits derive from the ``logits`` leaf; old_logp and
    prev_logp are fixed data (from the stored logits), so finite differences see them constant."""
    logp_full = torch.log_softmax(logits, -1)  # [N, T, V]
    logp = logp_full.gather(-1, d["tokens"][..., None]).squeeze(-1)  # [N, T]
    logp0 = torch.log_softmax(d["logits"], -1).gather(-1, d["tokens"][..., None]).squeeze(-1)  # [N, T]
    ref_logp = torch.log_softmax(d["ref_logits"], -1).gather(-1, d["tokens"][..., None]).squeeze(-1)
    return PolicyLossInput(
        logp=logp, old_logp=logp0 + d["old_offset"], advantages=d["adv"], mask=d["mask"],
        ref_logp=ref_logp, rewards=d["rewards"], group_index=d["group_index"],
        entropy=-(logp_full.exp() * logp_full).sum(-1), logits=logits, ref_logits=d["ref_logits"],
        teacher_logits=d["teacher_logits"], prev_logp=logp0 + d["prev_offset"], baseline_v=d["baseline_v"],
    )


def _cat(d: dict, extra: dict, order: list[int]) -> dict:
    """Concatenate per-token tensors with ``extra`` columns, then reorder the columns."""
    out = dict(d)
    idx = torch.tensor(order)
    for key, val in extra.items():
        out[key] = torch.cat([d[key], val], dim=1)[:, idx]
    return out


def _reduced(name: str, d: dict, logits: torch.Tensor) -> torch.Tensor:
    entry = LOSSES.entry(name)
    inp = _inp(d, logits)
    per_token, metrics = entry.fn(inp)
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    mode = entry.meta["reduction"]
    denom = reduction_denominator(inp.mask, mode, max_len=T)
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=denom)


@pytest.mark.parametrize("name", OURS)
def test_registered_with_valid_meta(name):
    meta = LOSSES.entry(name).meta
    assert meta["reduction"] in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
    # every declared input is one the learner always has, or has a provider (tilt.providers)
    assert all(n in INTRINSIC["loss"] or n in PROVIDERS for n in LOSSES.entry(name).needs({}))


@pytest.mark.parametrize("name", OURS)
def test_padding_and_interior_mask_change_nothing(name):
    """Trailing garbage padding, and garbage masked columns inside the sequences, leave the
    reduced loss and its gradient unchanged (masked == selected-only)."""
    d = _data()
    base_logits = d["logits"].clone().requires_grad_(True)
    base = _reduced(name, d, base_logits)
    (g_base,) = torch.autograd.grad(base, base_logits)
    assert torch.isfinite(base) and torch.isfinite(g_base).all()
    for order in ([0, 1, 2, 3, 4], [0, 3, 1, 4, 2]):  # padding at the end / masked columns inside
        padded = _cat(d, _garbage(2), order)
        leaf = d["logits"].clone().requires_grad_(True)
        garbage_leaf = padded["logits"][:, [order.index(3), order.index(4)]].clone().requires_grad_(True)
        logits = torch.cat([leaf, garbage_leaf], dim=1)[:, torch.tensor(order)]
        value = _reduced(name, padded, logits)
        g_leaf, g_garbage = torch.autograd.grad(value, [leaf, garbage_leaf])
        torch.testing.assert_close(value, base, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_leaf, g_base, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(g_garbage).all() and (g_garbage == 0).all()


@pytest.mark.parametrize("name", [n for n in OURS if n not in STOP_GRADIENT_SURROGATES])
def test_gradient_matches_finite_differences(name):
    """gradcheck in float64 w.r.t. the logits that produce logp, entropy and logits.

    TOPR's truncated ratio min(pi/mu, 1) is a stop-gradient weight (arXiv:2503.14286), so finite
    differences only agree where it is constant: there the ratios are set above 1 (truncated)."""
    d = _data(seed=2)
    if name == "topr":
        d["old_offset"] = -d["old_offset"]  # pi/mu in [1.05, 1.16]: weight 1 on every token
    logits = d["logits"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _reduced(name, d, x), (logits,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_unknown_loss_name_lists_valid_ones():
    with pytest.raises(KeyError, match="valid names: .*grpo"):
        LOSSES.get("grpo_typo")
