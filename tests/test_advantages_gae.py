"""GAE with a value model (catalogue C1) and the value head / value loss it trains."""
from __future__ import annotations

import math

import pytest
import torch

from tilt.advantages import ADVANTAGES
from tilt.advantages.gae import gae_advantages_returns
from tilt.batch import AdvantageInput
from tilt.value_head import ValueHead, value_loss


def test_gae_hand_value_lambda_one_is_reward_minus_value():
    r = torch.tensor([[1.0]], dtype=torch.float64)
    v = torch.tensor([[[0.5, 0.2, 0.4]]], dtype=torch.float64)
    m = torch.ones(1, 1, 3, dtype=torch.float64)
    dense = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    # gamma = lam = 1: delta_2 = 1 + 0 - 0.4 = 0.6; delta_1 = 0.4 - 0.2 = 0.2;
    #                  delta_0 = 0.2 - 0.5 = -0.3
    # A_2 = 0.6, A_1 = 0.2 + 0.6 = 0.8, A_0 = -0.3 + 0.8 = 0.5  (= r - V_t)
    adv, ret = gae_advantages_returns(dense, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[0, 0], torch.tensor([0.5, 0.8, 0.6], dtype=torch.float64))
    torch.testing.assert_close(ret[0, 0], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    # lam = 0.5: A_2 = 0.6, A_1 = 0.2 + 0.5 * 0.6 = 0.5, A_0 = -0.3 + 0.5 * 0.5 = -0.05
    adv, ret = gae_advantages_returns(dense, v, m, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv[0, 0], torch.tensor([-0.05, 0.5, 0.6], dtype=torch.float64))
    torch.testing.assert_close(ret[0, 0], torch.tensor([0.45, 0.7, 1.0], dtype=torch.float64))
    # registered estimator whitens: mean 0.35, devs -0.4, 0.15, 0.25, unbiased var 0.245 / 2
    # = 0.1225 -> std 0.35 -> [-8/7, 3/7, 5/7]
    out, metrics = ADVANTAGES.get("gae")(AdvantageInput(rewards=r, mask=m, values=v), lam=0.5)
    torch.testing.assert_close(out[0, 0], torch.tensor([-8 / 7, 3 / 7, 5 / 7], dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    assert float(metrics["gae/returns_mean"]) == pytest.approx((0.45 + 0.7 + 1.0) / 3)


def test_gae_gamma_discount_hand_value():
    # one token-level reward 1 at t = 1, V = 0, gamma = 0.5, lam = 1: A_1 = 1, A_0 = 0 + 0.5 * 1
    dense = torch.tensor([[0.0, 1.0]])
    adv, _ = gae_advantages_returns(dense, torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, 1.0]))


def naive_gae(rewards, values, gamma, lam):
    """Plain GAE on a compressed (valid-tokens-only) sequence."""
    n = len(rewards)
    adv, running = [0.0] * n, 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (1.0, 0.0)])
def test_gae_equals_naive_loop_on_masks_with_gaps(gamma, lam):
    """Masked positions inside a completion are skipped (verl): equal to GAE on valid tokens."""
    g = torch.Generator().manual_seed(0)
    B, G, T = 2, 3, 7
    mask = (torch.rand(B, G, T, generator=g) < 0.7).double()
    mask[..., 0] = 1.0
    r = torch.randn(B, G, generator=g).double()
    v = torch.randn(B, G, T, generator=g).double()
    kl = 0.1 * torch.randn(B, G, T, generator=g).double()
    inp = AdvantageInput(rewards=r, mask=mask, values=v, token_rewards=kl)
    adv, _ = ADVANTAGES.get("gae")(inp, gamma=gamma, lam=lam, whiten=False)
    for b in range(B):
        for i in range(G):
            idx = [t for t in range(T) if mask[b, i, t] > 0]
            rewards = [float(kl[b, i, t]) for t in idx]
            rewards[-1] += float(r[b, i])
            want = naive_gae(rewards, [float(v[b, i, t]) for t in idx], gamma, lam)
            torch.testing.assert_close(adv[b, i, idx], torch.tensor(want, dtype=torch.float64))
    whitened, _ = ADVANTAGES.get("gae")(inp, gamma=gamma, lam=lam)
    vals = adv[mask > 0]
    expected = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(whitened[mask > 0], expected)


def test_gae_needs_values():
    with pytest.raises(ValueError, match="values"):
        ADVANTAGES.get("gae")(AdvantageInput(rewards=torch.ones(1, 2), mask=torch.ones(1, 2, 3)))


# ----------------------------------------------------------------------------- value head

def test_value_head_starts_at_zero_and_is_linear():
    head = ValueHead(2)
    h = torch.tensor([[[3.0, 4.0]]])
    assert float(head(h).detach()) == 0.0
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.proj.bias.fill_(0.5)
    # 1 * 3 + 2 * 4 + 0.5 = 11.5
    assert head(h).shape == (1, 1) and float(head(h).detach()) == 11.5


def test_value_loss_hand_values_plain_and_clipped():
    values = torch.tensor([[1.0, 2.0]])
    returns = torch.tensor([[0.0, 2.5]])
    mask = torch.ones(1, 2)
    # errors 1 and 0.25 -> 0.5 * 1.25 / 2 = 0.3125
    loss, metrics = value_loss(values, returns, mask)
    assert float(loss) == pytest.approx(0.3125)
    assert float(metrics["value/clip_frac"]) == 0.0
    # clipping: V = 1, V_old = 0.5, c = 0.2 -> clipped 0.7; R = 1.2: (0.7-1.2)^2 = 0.25 > 0.04
    # -> loss = 0.5 * 0.25 = 0.125, clip_frac = 1
    loss, metrics = value_loss(torch.tensor([[1.0]]), torch.tensor([[1.2]]), torch.ones(1, 1),
                               clip_range=0.2, old_values=torch.tensor([[0.5]]))
    assert float(loss) == pytest.approx(0.125)
    assert float(metrics["value/clip_frac"]) == 1.0
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, returns, mask, clip_range=0.2)


def test_value_loss_masked_equals_selected_and_explicit_denominator():
    g = torch.Generator().manual_seed(1)
    values, returns = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    loss, _ = value_loss(values, returns, mask)
    sel = mask > 0
    want = 0.5 * ((values[sel] - returns[sel]) ** 2).mean()
    torch.testing.assert_close(loss, want)
    # two micro-batches with the full-batch denominator add up to the full-batch loss
    denom = float(mask.sum())
    l1, _ = value_loss(values[:1], returns[:1], mask[:1], denominator=denom)
    l2, _ = value_loss(values[1:], returns[1:], mask[1:], denominator=denom)
    torch.testing.assert_close(l1 + l2, loss)


def test_value_loss_gradcheck_float64_and_finite_grad():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    returns = torch.randn(2, 4, generator=g, dtype=torch.float64)
    old = values.detach() + 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: value_loss(v, returns, mask)[0], (values,))
    assert torch.autograd.gradcheck(
        lambda v: value_loss(v, returns, mask, clip_range=0.1, old_values=old)[0], (values,))
    loss, _ = value_loss(values, returns, mask)
    loss.backward()
    assert torch.isfinite(values.grad).all()
    assert torch.all(values.grad[mask == 0] == 0)
    assert not math.isnan(float(loss.detach()))
