"""Group-baseline estimators: QAE (catalogue C2) and CANON (catalogue C3)."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from tilt.advantages import ADVANTAGES
from tilt.advantages.quantile import group_quantile
from tilt.batch import AdvantageInput


def qae(r, **kw):
    mask = torch.ones(*r.shape, 2, dtype=r.dtype)
    adv, metrics = ADVANTAGES.get("qae")(AdvantageInput(rewards=r, mask=mask), **kw)
    return adv[..., 0], metrics


# ----------------------------------------------------------------------------- QAE

def test_qae_hand_values_hard_and_easy_query():
    # hard: r = [1, 0, 0, 0, 0], p = 0.2 <= 1 - K = 0.6. K G = 2 -> 2nd smallest of
    # [0, 0, 0, 0, 1] = 0 -> A = r - 0; unbiased std: mean 0.2, (0.64 + 4 * 0.04) / 4 = 0.2
    adv, metrics = qae(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64), scale=False)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    assert float(metrics["adv/zero_frac"]) == pytest.approx(0.8)  # 4 of 5 get no signal
    adv, _ = qae(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert float(adv[0, 0]) == pytest.approx(1.0 / (0.2 ** 0.5 + 1e-6))
    # easy: r = [1, 1, 1, 1, 0], p = 0.8 > 0.6: sorted [0, 1, 1, 1, 1], 2nd = 1 -> A = r - 1
    adv, metrics = qae(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64), scale=False)
    torch.testing.assert_close(adv[0], torch.tensor([0.0, 0, 0, 0, -1], dtype=torch.float64))
    assert float(metrics["qae/neg_frac"]) == pytest.approx(0.2)


def test_qae_lower_vs_linear_quantile_hand_values():
    r = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    # lower (inverse CDF): ceil(0.4 * 5) = 2nd smallest = 0
    assert float(group_quantile(r, 0.4)) == 0.0
    # linear (torch.quantile): position 0.4 * (5 - 1) = 1.6 between 0 (idx 1) and 1 (idx 2) -> 0.6
    assert float(group_quantile(r, 0.4, interpolation="linear")) == pytest.approx(0.6)
    adv, _ = qae(r, scale=False, interpolation="linear")
    torch.testing.assert_close(adv[0], torch.tensor([-0.6, -0.6, 0.4, 0.4, 0.4]))
    with pytest.raises(ValueError, match="interpolation"):
        group_quantile(r, 0.4, interpolation="nearest")
    with pytest.raises(ValueError, match="K"):
        group_quantile(r, 1.0)


@pytest.mark.parametrize("k", ["0.2", "0.25", "0.4", "0.5", "0.6", "0.8"])
def test_qae_two_regime_gate_property_binary_rewards(k):
    """p <= 1 - K: only successes get signal (A > 0); p > 1 - K: only failures (A < 0)."""
    for G in range(2, 11):
        for n in range(G + 1):
            r = torch.tensor([[1.0] * n + [0.0] * (G - n)], dtype=torch.float64)
            adv, _ = qae(r, k=float(k))
            succ, fail = adv[0, :n], adv[0, n:]
            if Fraction(n, G) <= 1 - Fraction(k):
                assert torch.all(succ > 0) and torch.all(fail == 0), (G, n, k)
            else:
                assert torch.all(succ == 0) and torch.all(fail < 0), (G, n, k)


def test_qae_equals_naive_loop_random_rewards():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 7, generator=g, dtype=torch.float64)
    adv, _ = qae(r, k=0.3)
    for b in range(4):
        xs = sorted(float(x) for x in r[b])
        q = next(x for i, x in enumerate(xs) if (i + 1) / 7 >= 0.3)  # inf{z: F(z) >= K}
        mean = sum(xs) / 7
        std = (sum((x - mean) ** 2 for x in xs) / 6) ** 0.5
        for i in range(7):
            assert float(adv[b, i]) == pytest.approx((float(r[b, i]) - q) / (std + 1e-6))


# ----------------------------------------------------------------------------- CANON

def canon(r, metric_values, metric="entropy", **kw):
    B, G = r.shape
    T = 4
    if metric == "entropy":
        inp = AdvantageInput(rewards=r, mask=torch.ones(B, G, T, dtype=r.dtype),
                             entropy=metric_values.unsqueeze(-1).expand(B, G, T))
    else:  # metric_values are lengths
        mask = (torch.arange(T) < metric_values.unsqueeze(-1)).to(r.dtype)
        inp = AdvantageInput(rewards=r, mask=mask)
    adv, metrics = ADVANTAGES.get("canon")(inp, metric=metric, **kw)
    return adv[..., 0], metrics


def test_canon_hand_values_inter_intra_and_dr_grpo_special_case():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    ent = torch.tensor([[0.9, 0.1, 0.8, 0.2]])
    # low-entropy half {1, 3}: rewards 0, 0 -> mean 0; high half {0, 2}: 1, 1 -> mean 1
    # mu = 1 (inter): high r - mean_low = 1 - 0 = 1; low r - mean_high = 0 - 1 = -1
    adv, metrics = canon(r, ent, mu=1.0)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert float(metrics["canon/high_minus_low"]) == 1.0
    # mu = 0 (intra): every response equals its half's mean -> 0
    adv, _ = canon(r, ent, mu=0.0)
    torch.testing.assert_close(adv[0], torch.zeros(4))
    # mu = 1/2 with equal halves: r - (mean_low + mean_high) / 2 = r - mean_g r = Dr. GRPO
    adv, _ = canon(r, ent, mu=0.5)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, 0.5, -0.5]))


def test_canon_hand_value_odd_group_by_length():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    lengths = torch.tensor([[4, 2, 3, 1, 1]])
    # stable ascending by length: idx 3 (1), idx 4 (1), idx 1 (2), idx 2 (3), idx 0 (4)
    # low = floor(5/2) = 2 smallest {3, 4}: rewards 1, 0 -> 0.5; high {1, 2, 0}: 0, 1, 1 -> 2/3
    # mu = 0.75: idx 0 (high, 1): 0.75 (1 - 0.5) + 0.25 (1 - 2/3) = 0.375 + 1/12 = 0.458333
    #            idx 1 (high, 0): 0.75 (-0.5) + 0.25 (-2/3) = -0.541667
    #            idx 3 (low, 1):  0.75 (1 - 2/3) + 0.25 (1 - 0.5) = 0.25 + 0.125 = 0.375
    #            idx 4 (low, 0):  0.75 (-2/3) + 0.25 (-0.5) = -0.625
    adv, _ = canon(r, lengths, metric="length", mu=0.75)
    want = torch.tensor([0.375 + 1 / 12, -0.375 - 1 / 6, 0.375 + 1 / 12, 0.375, -0.625])
    torch.testing.assert_close(adv[0], want)


def test_canon_direction_flips_when_metric_reward_relation_flips():
    r = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    up, _ = canon(r, torch.tensor([[0.9, 0.8, 0.1, 0.2]]))  # successes have high entropy
    down, _ = canon(r, torch.tensor([[0.1, 0.2, 0.9, 0.8]]))  # successes have low entropy
    high_up = up[0, :2].sum()  # the high-entropy half is {0, 1} in the first case
    high_down = down[0, 2:].sum()  # and {2, 3} in the second
    assert float(high_up) > 0 > float(high_down)
    # random groups: the high half's summed inter advantage has the sign of mean_H - mean_L
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r = torch.randint(0, 2, (1, 6), generator=g).float()
        ent = torch.rand(1, 6, generator=g)
        adv, metrics = canon(r, ent, mu=1.0)
        high = ent[0].argsort()[3:]
        gap = float(metrics["canon/high_minus_low"])
        assert float(adv[0, high].sum()) == pytest.approx(3 * gap, abs=1e-6)


def test_canon_equals_naive_loop():
    g = torch.Generator().manual_seed(1)
    for G in (2, 5, 8):
        r = torch.randn(3, G, generator=g, dtype=torch.float64)
        ent = torch.rand(3, G, generator=g, dtype=torch.float64)
        adv, _ = canon(r, ent, mu=0.3)
        for b in range(3):
            order = sorted(range(G), key=lambda i: float(ent[b, i]))
            low, high = order[: G // 2], order[G // 2:]
            m_low = sum(float(r[b, i]) for i in low) / len(low)
            m_high = sum(float(r[b, i]) for i in high) / len(high)
            for i in range(G):
                own, other = (m_high, m_low) if i in high else (m_low, m_high)
                want = 0.3 * (float(r[b, i]) - other) + 0.7 * (float(r[b, i]) - own)
                assert float(adv[b, i]) == pytest.approx(want)


def test_canon_errors():
    r = torch.ones(1, 3)
    with pytest.raises(ValueError, match="entropy"):
        ADVANTAGES.get("canon")(AdvantageInput(rewards=r, mask=torch.ones(1, 3, 2)))
    with pytest.raises(ValueError, match="metric"):
        ADVANTAGES.get("canon")(AdvantageInput(rewards=r, mask=torch.ones(1, 3, 2)), metric="depth")


def test_canon_entropy_metric_is_the_masked_mean_on_ragged_completions():
    g = torch.Generator().manual_seed(3)
    B, G, T = 2, 6, 5
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()
    ent = torch.rand(B, G, T, generator=g).double()
    ent_padded = torch.where(mask > 0, ent, torch.full_like(ent, 100.0))  # junk off the mask
    r = torch.rand(B, G, generator=g).double()
    adv, _ = ADVANTAGES.get("canon")(AdvantageInput(rewards=r, mask=mask, entropy=ent_padded), mu=0.6)
    for b in range(B):
        means = [sum(float(ent[b, i, t]) for t in range(int(lengths[b, i]))) / int(lengths[b, i])
                 for i in range(G)]
        order = sorted(range(G), key=lambda i: means[i])
        low, high = order[: G // 2], order[G // 2:]
        m_low = sum(float(r[b, i]) for i in low) / len(low)
        m_high = sum(float(r[b, i]) for i in high) / len(high)
        for i in range(G):
            own, other = (m_high, m_low) if i in high else (m_low, m_high)
            want = 0.6 * (float(r[b, i]) - other) + 0.4 * (float(r[b, i]) - own)
            n = int(lengths[b, i])
            torch.testing.assert_close(adv[b, i, :n], torch.full((n,), want, dtype=torch.float64))
