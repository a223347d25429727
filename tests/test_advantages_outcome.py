"""Outcome advantage estimators (catalogue C1): grpo, dr_grpo, rloo, reinforce_pp(_baseline).

Hand-computed values, equality with naive per-sample Python loops on ragged random batches,
RLOO's zero group mean / unbiasedness, padding invariance of every registered estimator.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from tilt.advantages import ADVANTAGES
from tilt.batch import AdvantageInput
from tilt.registry import UnknownNameError


def ragged(B=3, G=4, T=6, seed=0, binary=True):
    """Random rewards and right-padded masks with lengths in 1..T."""
    g = torch.Generator().manual_seed(seed)
    if binary:
        r = torch.randint(0, 2, (B, G), generator=g).double()
    else:
        r = torch.randn(B, G, generator=g).double()
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()  # [B, G, T]
    return r, mask


def full_input(B=2, G=4, T=6, seed=0):
    """An AdvantageInput with every optional field filled (ragged mask)."""
    g = torch.Generator().manual_seed(seed)
    r, mask = ragged(B, G, T, seed)
    S = 3
    ends = torch.sort(torch.randint(0, T, (B, G, S), generator=g), dim=-1).values
    return AdvantageInput(
        rewards=r, mask=mask,
        step_rewards=torch.rand(B, G, S, generator=g).double(), step_ends=ends,
        token_ids=torch.randint(0, 3, (B, G, T), generator=g),
        entropy=torch.rand(B, G, T, generator=g).double(),
        values=torch.randn(B, G, T, generator=g).double(),
        token_rewards=0.1 * torch.randn(B, G, T, generator=g).double(),
    )


def provided(name, inp):
    """Keywords an estimator reads from a provider (not an AdvantageInput field), stubbed: infalign's
    ref_rewards [B, G, M], M = 3 reference rewards per prompt repeated over its G rows."""
    if "ref_rewards" in ADVANTAGES.entry(name).needs():
        B, G = inp.rewards.shape
        ref = torch.linspace(-1.0, 1.0, 3, dtype=inp.rewards.dtype)
        return {"ref_rewards": ref.expand(B, G, 3)}
    return {}


def run(name, r, mask, **kw):
    adv, metrics = ADVANTAGES.get(name)(AdvantageInput(rewards=r, mask=mask), **kw)
    return adv, metrics


# ----------------------------------------------------------------------------- registry

def test_registry_holds_every_catalogue_estimator_and_rejects_unknown_names():
    expected = {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae", "qae",
                "canon", "pure", "tempo", "spo_chain"}
    assert expected <= set(ADVANTAGES.names())
    with pytest.raises(UnknownNameError) as err:
        ADVANTAGES.get("grpoo")
    assert "grpo" in str(err.value) and "rloo" in str(err.value)
    for name in expected:
        assert "needs" in ADVANTAGES.entry(name).meta


@pytest.mark.parametrize("name", sorted(ADVANTAGES.names()))
def test_every_estimator_zero_off_mask_reports_zero_frac_and_is_detached(name):
    inp = full_input()
    inp.rewards.requires_grad_(True)
    adv, metrics = ADVANTAGES.get(name)(inp, **provided(name, inp))
    assert adv.shape == inp.mask.shape
    assert torch.all(adv[inp.mask == 0] == 0)
    assert torch.isfinite(adv).all()
    assert not adv.requires_grad  # advantages are constants for the policy gradient
    z = metrics["adv/zero_frac"]
    peak = (adv.abs() * inp.mask).amax(-1)
    assert float(z) == pytest.approx(float((peak < 1e-8).double().mean()))


@pytest.mark.parametrize("name", sorted(ADVANTAGES.names()))
def test_every_estimator_padding_changes_nothing(name):
    inp = full_input(seed=3)
    adv, _ = ADVANTAGES.get(name)(inp, **provided(name, inp))
    g = torch.Generator().manual_seed(9)
    B, G, T = inp.mask.shape
    pad = 3

    def extend(x, fill):
        if x is None:
            return None
        junk = fill(B, G, pad)
        return torch.cat([x, junk.to(x.dtype)], dim=-1)

    padded = AdvantageInput(
        rewards=inp.rewards, mask=extend(inp.mask, lambda *s: torch.zeros(*s)),
        step_rewards=inp.step_rewards, step_ends=inp.step_ends,
        token_ids=extend(inp.token_ids, lambda *s: torch.randint(0, 3, s, generator=g)),
        entropy=extend(inp.entropy, lambda *s: torch.rand(*s, generator=g)),
        values=extend(inp.values, lambda *s: torch.randn(*s, generator=g)),
        token_rewards=extend(inp.token_rewards, lambda *s: torch.randn(*s, generator=g)),
    )
    adv_p, _ = ADVANTAGES.get(name)(padded, **provided(name, inp))
    torch.testing.assert_close(adv_p[..., :T], adv)
    assert torch.all(adv_p[..., T:] == 0)


# ----------------------------------------------------------------------------- grpo

def test_grpo_hand_value_group_std_unbiased_as_trl():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(1, 4, 2)
    # mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 0.25 -> std 0.5
    # eps = 1e-4 (TRL): A = 0.75 / 0.5001 = 1.4997..., -0.25 / 0.5001 = -0.49990...
    adv, metrics = run("grpo", r, mask)
    expected = torch.tensor([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    torch.testing.assert_close(adv[0, :, 0], expected)
    torch.testing.assert_close(adv[0, :, 1], expected)
    assert float(metrics["adv/zero_frac"]) == 0.0
    adv0, _ = run("grpo", r, mask, eps=0.0)  # exactly 1.5 and -0.5
    torch.testing.assert_close(adv0[0, :, 0], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_grpo_batch_scaling_and_all_equal_group_gives_zero():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.ones(2, 2, 1)
    # group means 0.5 and 1 -> centred [0.5, -0.5], [0, 0]; batch std of [1, 0, 1, 1]:
    # mean 0.75, sum sq dev = 3 * 0.0625 + 0.5625 = 0.75, / 3 = 0.25 -> 0.5 -> A = [1, -1], [0, 0]
    adv, metrics = run("grpo", r, mask, scale_rewards="batch", eps=0.0)
    torch.testing.assert_close(adv[..., 0], torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert float(metrics["adv/zero_frac"]) == 0.5  # the all-equal group has no signal
    with pytest.raises(ValueError, match="scale_rewards"):
        run("grpo", r, mask, scale_rewards="global")


def test_dr_grpo_hand_value_no_std():
    # r = [3, 1]: mean 2 -> A = [1, -1] (no division)
    adv, _ = run("dr_grpo", torch.tensor([[3.0, 1.0]]), torch.ones(1, 2, 3))
    torch.testing.assert_close(adv[0, :, 2], torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_equals_naive_loop_on_ragged_batches(scale):
    for seed in range(4):
        r, mask = ragged(seed=seed, binary=seed % 2 == 0)
        adv, _ = run("grpo", r, mask, scale_rewards=scale)
        flat = [float(x) for x in r.reshape(-1)]
        batch_std = statistics.stdev(flat)
        for b in range(r.shape[0]):
            group = [float(x) for x in r[b]]
            mean = sum(group) / len(group)
            std = {"group": statistics.stdev(group), "batch": batch_std, "none": None}[scale]
            for i in range(r.shape[1]):
                a = group[i] - mean if std is None else (group[i] - mean) / (std + 1e-4)
                for t in range(mask.shape[-1]):
                    want = a if mask[b, i, t] else 0.0
                    assert float(adv[b, i, t]) == pytest.approx(want, abs=1e-9)


# ----------------------------------------------------------------------------- rloo

def test_rloo_hand_value():
    # r = [1, 0, 0, 0]: A_0 = 1 - (0+0+0)/3 = 1; A_j = 0 - (1+0+0)/3 = -1/3
    adv, _ = run("rloo", torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.ones(1, 4, 1))
    torch.testing.assert_close(adv[0, :, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_rloo_equals_naive_loop_and_group_mean_is_zero():
    for seed in range(4):
        r, mask = ragged(seed=seed, binary=False)
        adv, _ = run("rloo", r, mask)
        for b in range(r.shape[0]):
            for i in range(r.shape[1]):
                others = [float(r[b, j]) for j in range(r.shape[1]) if j != i]
                a = float(r[b, i]) - sum(others) / len(others)
                valid = mask[b, i] > 0
                want = torch.full((int(valid.sum()),), a, dtype=r.dtype)
                torch.testing.assert_close(adv[b, i][valid], want)
        seq_adv = (adv * mask).sum(-1) / mask.sum(-1)  # [B, G]
        torch.testing.assert_close(seq_adv.mean(1), torch.zeros(r.shape[0], dtype=r.dtype))


def test_rloo_is_unbiased_expected_advantage_zero_for_every_completion():
    # E[A_i] = E[r_i] - E[mean_{j != i} r_j] = 0 for i.i.d. completions. Exact check over all
    # 2^G binary outcomes of a Bernoulli(p) group, weighted by their probabilities.
    G, p = 4, 0.3
    outcomes = torch.tensor([[(k >> i) & 1 for i in range(G)] for k in range(2 ** G)],
                            dtype=torch.float64)
    prob = (p ** outcomes.sum(1)) * ((1 - p) ** (G - outcomes.sum(1)))  # [2^G]
    adv, _ = run("rloo", outcomes, torch.ones(2 ** G, G, 1, dtype=torch.float64))
    expected_adv = (prob.unsqueeze(1) * adv[..., 0]).sum(0)  # [G]
    torch.testing.assert_close(expected_adv, torch.zeros(G, dtype=torch.float64))
    # the baseline is independent of the sample it scores: E[A_i * r_i] = Var(r_i) = p (1 - p)
    weighted = (prob.unsqueeze(1) * adv[..., 0] * outcomes).sum(0)
    torch.testing.assert_close(weighted, torch.full((G,), p * (1 - p), dtype=torch.float64))


def test_rloo_needs_two_completions():
    with pytest.raises(ValueError, match=">= 2 completions"):
        run("rloo", torch.tensor([[1.0]]), torch.ones(1, 1, 2))


# ----------------------------------------------------------------------------- reinforce++

def test_reinforce_pp_hand_value_batch_whitening():
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    # gamma = 1: returns seq0 = [1, 1], seq1 = [0]; valid values [1, 1, 0]: mean 2/3,
    # unbiased var = ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3 -> A = dev * sqrt(3) (+1e-8 in the root)
    adv, _ = run("reinforce_pp", r, mask)
    s = 1 / math.sqrt(1 / 3 + 1e-8)
    want = torch.tensor([[s / 3, s / 3], [-2 * s / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)


def test_reinforce_pp_baseline_hand_value():
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    # scores 1, 0, group mean 0.5 -> [0.5, 0.5], [-0.5]; mean 1/6, devs 1/3, 1/3, -2/3,
    # unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3 -> A = dev * sqrt(3)
    adv, _ = run("reinforce_pp_baseline", r, mask)
    s = 1 / math.sqrt(1 / 3 + 1e-8)
    want = torch.tensor([[s / 3, s / 3], [-2 * s / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)


def naive_whiten(per_seq_values):
    flat = [v for seq in per_seq_values for v in seq]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / max(len(flat) - 1, 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) for v in seq] for seq in per_seq_values]


@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_reinforce_pp_equals_naive_loop_with_token_rewards(gamma):
    for seed in range(3):
        r, mask = ragged(seed=seed, binary=False)
        kl = 0.1 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed)).double()
        adv, _ = ADVANTAGES.get("reinforce_pp")(AdvantageInput(rewards=r, mask=mask, token_rewards=kl),
                                               gamma=gamma)
        B, G, T = mask.shape
        keys, seqs = [], []
        for b in range(B):
            for i in range(G):
                n = int(mask[b, i].sum())
                rewards = [float(kl[b, i, t]) for t in range(n)]
                rewards[-1] += float(r[b, i])
                ret, running = [0.0] * n, 0.0
                for t in reversed(range(n)):
                    running = rewards[t] + gamma * running
                    ret[t] = running
                keys.append((b, i, n))
                seqs.append(ret)
        for (b, i, n), want in zip(keys, naive_whiten(seqs)):
            torch.testing.assert_close(adv[b, i, :n], torch.tensor(want, dtype=torch.float64))


def test_reinforce_pp_baseline_equals_naive_loop():
    for seed in range(3):
        r, mask = ragged(seed=seed, binary=False)
        adv, _ = run("reinforce_pp_baseline", r, mask)
        B, G, _ = mask.shape
        keys, seqs = [], []
        for b in range(B):
            mean = sum(float(x) for x in r[b]) / G
            for i in range(G):
                n = int(mask[b, i].sum())
                keys.append((b, i, n))
                seqs.append([float(r[b, i]) - mean] * n)
        for (b, i, n), want in zip(keys, naive_whiten(seqs)):
            torch.testing.assert_close(adv[b, i, :n], torch.tensor(want, dtype=torch.float64))
