"""Invariances of the five paper-fidelity losses (A5 aer, A6 lp_reg, B4 haepo, B7 lens, B9 redi).

For each registered loss, reduced with its declared reduction: trailing padding changes nothing,
a masked interior column equals dropping it (masked == selected-only, value and gradient), the
gradient is finite, and gradcheck holds in float64 (lp_reg's gradcheck, which must hold its
stop-gradient proxy fixed, is in tests/test_regularizers.py).
"""
import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from loss_helpers import reduced_loss

D = torch.float64
N, T, V = 4, 4, 5
FIVE = {"aer": dict(alpha=0.3), "lp_reg": dict(min_p=0.1, neg_frac=0.5, pos_frac=0.5),
        "haepo": dict(entropy_coef=0.1, kl_coef=0.1), "lens": dict(), "redi": dict()}


def _data(seed=0):
    """Two groups of two sequences; group 1 is all wrong (LENS's case); row 3 is one token shorter."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=gen, dtype=D)  # [N, T, V]
    tokens = torch.randint(0, V, (N, T), generator=gen)
    mask = torch.ones(N, T, dtype=D)
    mask[3, -1] = 0.0
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5], dtype=D)[:, None].expand(N, T).clone()
    return dict(logits=logits, tokens=tokens, mask=mask, adv=adv,
                old_shift=0.1 * torch.randn(N, T, generator=gen, dtype=D),
                prev_shift=0.2 * torch.randn(N, T, generator=gen, dtype=D),
                rewards=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D), group_index=torch.tensor([0, 0, 1, 1]))


def _inp(d, logits):
    logp_all = torch.log_softmax(logits, -1)  # [N, T, V]
    logp = logp_all.gather(-1, d["tokens"][..., None])[..., 0]  # [N, T]
    return PolicyLossInput(
        logp=logp, old_logp=logp.detach() + d["old_shift"], advantages=d["adv"], mask=d["mask"],
        rewards=d["rewards"], group_index=d["group_index"], entropy=-(logp_all.exp() * logp_all).sum(-1),
        logits=logits, prev_logp=logp.detach() + d["prev_shift"])


def _insert_garbage_column(d, at):
    """A masked column of garbage at position ``at`` (logits 9, token 0, advantage 7, shifts 5)."""
    def ins(x, val):
        col = torch.full(x[:, :1].shape, val, dtype=x.dtype)
        return torch.cat([x[:, :at], col, x[:, at:]], 1)
    out = dict(d, logits=ins(d["logits"], 9.0), tokens=ins(d["tokens"], 0), adv=ins(d["adv"], 7.0),
               old_shift=ins(d["old_shift"], 5.0), prev_shift=ins(d["prev_shift"], 5.0))
    out["mask"] = ins(d["mask"], 0.0)
    return out


def _value_and_grad(name, d):
    logits = d["logits"].clone().requires_grad_(True)
    loss, _ = reduced_loss(name, _inp(d, logits), **FIVE[name])
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("name", sorted(FIVE))
def test_padding_and_masked_column_change_nothing(name):
    d = _data()
    value, grad = _value_and_grad(name, d)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if name == "lp_reg":  # the data must exercise the regularised branch
        assert LOSSES.get(name)(_inp(d, d["logits"]), **FIVE[name])[1]["lp_reg/frac"] > 0
    padded, pgrad = _value_and_grad(name, _insert_garbage_column(d, T))  # trailing padding
    torch.testing.assert_close(padded, value, atol=1e-12, rtol=0)
    torch.testing.assert_close(pgrad[:, :T], grad, atol=1e-12, rtol=0)
    inner, igrad = _value_and_grad(name, _insert_garbage_column(d, 1))  # masked == selected-only
    torch.testing.assert_close(inner, value, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat([igrad[:, :1], igrad[:, 2:]], 1), grad, atol=1e-12, rtol=0)
    assert igrad[:, 1].abs().max() == 0


@pytest.mark.parametrize("name", ["aer", "haepo", "lens", "redi"])
def test_gradcheck_in_logp_float64(name):
    d = _data(seed=1)
    base = _inp(d, d["logits"])
    fn = LOSSES.get(name)

    def f(lp):
        fields = dict(base.__dict__, logp=lp, entropy=base.entropy.detach())
        return fn(PolicyLossInput(**fields), **FIVE[name])[0]

    assert torch.autograd.gradcheck(f, (base.logp.detach().clone().requires_grad_(True),))
