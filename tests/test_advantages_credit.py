"""Token-level credit assignment: PURE (C4), TEMPO (C5), SPO-chain (C6)."""
from __future__ import annotations

import math

import pytest
import torch

from tilt.advantages import ADVANTAGES
from tilt.advantages.outcome import group_normalised
from tilt.advantages.process import min_form_values, softmin_returns
from tilt.advantages.segment import cutpoints
from tilt.batch import AdvantageInput

NAN = float("nan")


# ----------------------------------------------------------------------------- PURE

def test_min_form_value_hand_value():
    # V_s = min_{k >= s} r_k: [0.9, 0.2, 0.7, 0.5] -> [0.2, 0.2, 0.5, 0.5]
    r = torch.tensor([0.9, 0.2, 0.7, 0.5])
    v = min_form_values(r, torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(v, torch.tensor([0.2, 0.2, 0.5, 0.5]))


def test_pure_value_at_step_equals_min_of_future_step_rewards():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        S = int(torch.randint(1, 7, (1,), generator=g))
        r = torch.rand(S, generator=g)
        valid = torch.rand(S, generator=g) < 0.8
        v = min_form_values(r, valid)
        for s in range(S):
            future = [float(r[k]) for k in range(s, S) if valid[k]]
            want = min(future) if valid[s] else 0.0
            assert float(v[s]) == pytest.approx(want)
    # the softmin transform approaches it at the first step as T -> 0
    r = torch.tensor([0.9, 0.3, 0.7], dtype=torch.float64)
    ok = torch.ones(3, dtype=torch.bool)
    assert float(softmin_returns(r, ok, temperature=1e-3)[0]) == pytest.approx(0.3, abs=1e-9)
    assert float(softmin_returns(r, ok, temperature=10.0)[0]) == pytest.approx(
        float((torch.softmax(-r / 10, 0) * r).sum()))


def pure_input(rewards, step_rewards, step_ends, T):
    return AdvantageInput(rewards=torch.tensor(rewards, dtype=torch.float64),
                          mask=torch.ones(1, len(rewards), T, dtype=torch.float64),
                          step_rewards=torch.tensor(step_rewards, dtype=torch.float64),
                          step_ends=torch.tensor(step_ends))


def test_pure_min_form_hand_value_with_rloo_baseline_and_outcome():
    inp = pure_input([[1.0, 0.0]], [[[0.9, 0.2, 0.7], [0.6, 0.8, NAN]]], [[[1, 3, 5], [2, 5, -1]]], 6)
    # seq 0: V = [0.2, 0.2, 0.7], whole value 0.2; seq 1: V = [0.6, 0.8], whole value 0.6
    # RLOO baselines: seq 0 -> 0.6, seq 1 -> 0.2
    # seq 0 tokens 0-1 (step 0): 0.2 - 0.6 = -0.4; 2-3 (step 1): -0.4; 4-5 (step 2): 0.7 - 0.6 = 0.1
    # seq 1 tokens 0-2: 0.6 - 0.2 = 0.4; 3-5: 0.8 - 0.2 = 0.6
    adv, metrics = ADVANTAGES.get("pure")(inp, form="min")
    want = torch.tensor([[-0.4, -0.4, -0.4, -0.4, 0.1, 0.1], [0.4, 0.4, 0.4, 0.6, 0.6, 0.6]],
                        dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)
    assert float(metrics["pure/value_mean"]) == pytest.approx(0.4)
    # outcome_coef = 1: + (1 - 0) on seq 0, + (0 - 1) on seq 1
    adv, _ = ADVANTAGES.get("pure")(inp, form="min", outcome_coef=1.0)
    torch.testing.assert_close(adv[0], want + torch.tensor([[1.0], [-1.0]], dtype=torch.float64))


def test_pure_softmin_hand_value():
    inp = pure_input([[0.0, 0.0]], [[[1.0, 0.0], [0.5, NAN]]], [[[1, 3], [3, -1]]], 4)
    # seq 0: softmax(-[1, 0] / 0.5) = [e^-2, 1] / (1 + e^-2) = [0.119203, 0.880797]
    #        r* = [0.119203 * 1, 0.880797 * 0] -> G = [0.119203, 0]
    # seq 1: one step -> G = [0.5]. Baselines: seq 0 -> 0.5, seq 1 -> 0.119203
    w = math.exp(-2) / (1 + math.exp(-2))
    adv, _ = ADVANTAGES.get("pure")(inp, temperature=0.5)
    want = torch.tensor([[w - 0.5, w - 0.5, -0.5, -0.5], [0.5 - w] * 4], dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)


def naive_pure(rewards, step_rewards, step_ends, mask, form, temperature, coef):
    B, G, T = mask.shape
    out = torch.zeros(B, G, T, dtype=torch.float64)
    for b in range(B):
        per_tok, whole = {}, []
        for i in range(G):
            steps = [(float(step_rewards[b, i, s]), int(step_ends[b, i, s]))
                     for s in range(step_rewards.shape[-1])
                     if math.isfinite(float(step_rewards[b, i, s])) and int(step_ends[b, i, s]) >= 0]
            rs = [x for x, _ in steps]
            if form == "min":
                g = [min(rs[s:]) for s in range(len(rs))]
            else:
                z = sum(math.exp(-x / temperature) for x in rs)
                star = [math.exp(-x / temperature) / z * x for x in rs]
                g = [sum(star[s:]) for s in range(len(rs))]
            whole.append(g[0] if g else 0.0)
            for t in range(T):
                s = sum(1 for _, e in steps if e < t)
                per_tok[i, t] = g[s] if s < len(steps) else None
        for i in range(G):
            base = sum(whole[j] for j in range(G) if j != i) / (G - 1)
            rb = sum(float(rewards[b, j]) for j in range(G) if j != i) / (G - 1)
            for t in range(T):
                if mask[b, i, t] == 0:
                    continue
                proc = 0.0 if per_tok[i, t] is None else per_tok[i, t] - base
                out[b, i, t] = proc + coef * (float(rewards[b, i]) - rb)
    return out


@pytest.mark.parametrize("form", ["min", "softmin"])
def test_pure_equals_naive_loop_on_ragged_steps(form):
    g = torch.Generator().manual_seed(4)
    B, G, T, S = 2, 3, 8, 4
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()
    rewards = torch.randint(0, 2, (B, G), generator=g).double()
    step_rewards = torch.rand(B, G, S, generator=g).double()
    step_rewards[torch.rand(B, G, S, generator=g) < 0.25] = NAN
    step_ends = torch.sort(torch.randint(0, T, (B, G, S), generator=g), dim=-1).values
    inp = AdvantageInput(rewards=rewards, mask=mask, step_rewards=step_rewards, step_ends=step_ends)
    adv, _ = ADVANTAGES.get("pure")(inp, form=form, temperature=0.3, outcome_coef=0.5)
    want = naive_pure(rewards, step_rewards, step_ends, mask, form, 0.3, 0.5)
    torch.testing.assert_close(adv, want)


# ----------------------------------------------------------------------------- TEMPO

def tempo(token_ids, rewards, lengths=None, **kw):
    ids = torch.tensor(token_ids)
    B, G, T = ids.shape
    mask = torch.ones(B, G, T, dtype=torch.float64)
    if lengths is not None:
        mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(-1)).double()
    inp = AdvantageInput(rewards=torch.tensor(rewards, dtype=torch.float64), mask=mask, token_ids=ids)
    return ADVANTAGES.get("tempo")(inp, **kw)


def test_tempo_hand_value_branch_td_terms():
    # y0 = 5 6 7 (r=1), y1 = 5 6 8 (r=0), y2 = 4 1 2 (r=0); scale "none": r~ = [2/3, -1/3, -1/3]
    # V(5) = V(5 6) = (2/3 - 1/3) / 2 = 1/6; V(5 6 7) = 2/3; V(5 6 8) = -1/3
    # branch after "5 6": y0 token 2 TD = 2/3 - 1/6 = 1/2; y1 token 2 TD = -1/3 - 1/6 = -1/2
    # the root branch (5 vs 4) gets no TD term; y2 shares nothing -> plain GRPO
    adv, metrics = tempo([[[5, 6, 7], [5, 6, 8], [4, 1, 2]]], [[1.0, 0.0, 0.0]], scale_rewards="none")
    want = torch.tensor([[2 / 3, 2 / 3, 7 / 6], [-1 / 3, -1 / 3, -5 / 6], [-1 / 3, -1 / 3, -1 / 3]],
                        dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)
    assert float(metrics["tempo/branch_frac"]) == pytest.approx(2 / 9)
    adv, _ = tempo([[[5, 6, 7], [5, 6, 8], [4, 1, 2]]], [[1.0, 0.0, 0.0]], scale_rewards="none",
                   td_coef=0.5)
    assert float(adv[0, 0, 2]) == pytest.approx(2 / 3 + 0.25)


def test_tempo_equals_grpo_when_no_shared_prefix_past_the_prompt():
    g = torch.Generator().manual_seed(0)
    B, G, T = 3, 5, 6
    ids = torch.randint(0, 4, (B, G, T), generator=g)
    ids[..., 0] = torch.arange(G)  # all first tokens differ
    r = torch.randint(0, 2, (B, G), generator=g).double()
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()
    adv_t, metrics = ADVANTAGES.get("tempo")(AdvantageInput(rewards=r, mask=mask, token_ids=ids))
    adv_g, _ = ADVANTAGES.get("grpo")(AdvantageInput(rewards=r, mask=mask))
    torch.testing.assert_close(adv_t, adv_g)
    assert float(metrics["tempo/branch_frac"]) == 0.0


def naive_tempo(ids, mask, r_norm, td_coef):
    B, G, T = ids.shape
    out = torch.zeros(B, G, T, dtype=torch.float64)
    for b in range(B):
        seqs = [tuple(int(x) for x in ids[b, i, : int(mask[b, i].sum())]) for i in range(G)]

        def through(prefix):
            return [j for j in range(G)
                    if seqs[j][: len(prefix)] == prefix and len(seqs[j]) >= len(prefix)]

        def value(prefix):
            js = through(prefix)
            return sum(float(r_norm[b, j]) for j in js) / len(js)

        for i in range(G):
            for t in range(len(seqs[i])):
                a = float(r_norm[b, i])
                parent, child = seqs[i][:t], seqs[i][: t + 1]
                if t >= 1 and len(through(child)) < len(through(parent)):
                    a += td_coef * (value(child) - value(parent))
                out[b, i, t] = a
    return out


def test_tempo_equals_naive_prefix_tree_loop_on_ragged_groups():
    g = torch.Generator().manual_seed(2)
    B, G, T = 2, 6, 5
    ids = torch.randint(0, 2, (B, G, T), generator=g)  # tiny vocabulary -> many shared prefixes
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()
    r = torch.rand(B, G, generator=g).double()
    adv, _ = ADVANTAGES.get("tempo")(AdvantageInput(rewards=r, mask=mask, token_ids=ids), td_coef=0.7)
    want = naive_tempo(ids, mask, group_normalised(r), 0.7)
    torch.testing.assert_close(adv, want)


# ----------------------------------------------------------------------------- SPO-chain

def test_cutpoints_hand_values():
    probs = torch.tensor([[0.95, 0.5, 0.99, 0.3, 0.2, 0.97]])
    lp, mask = probs.log(), torch.ones(1, 6)
    # cutpoints (p < 0.9): tokens 1, 3, 4 -> n = 3
    cut, ends = cutpoints(lp, mask, threshold=0.9, max_segments=2)
    assert cut[0].tolist() == [False, True, False, True, True, False]
    # per = ceil(3 / 2) = 2: boundary after cutpoint rank 2 (token 3); last segment ends at 5
    assert ends[0].tolist() == [3, 5]
    # per = ceil(3 / 4) = 1: boundaries after ranks 1, 2, 3 (tokens 1, 3, 4), then 5
    assert cutpoints(lp, mask, threshold=0.9, max_segments=4)[1][0].tolist() == [1, 3, 4, 5]
    # no cutpoint: one segment; padding beyond the mask ignored
    short_mask = torch.tensor([[1.0, 1, 1, 0, 0, 0]])
    _, ends = cutpoints(torch.zeros(1, 6), short_mask, threshold=0.9, max_segments=3)
    assert ends[0].tolist() == [2, -1, -1]


def test_spo_chain_hand_value_with_probability_mask():
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[[1.0] * 6, [1.0, 1, 1, 0, 0, 0]]], dtype=torch.float64)
    values = torch.zeros(1, 2, 6, dtype=torch.float64)
    values[0, 0, 3] = 0.75  # MC value after token 3 of completion 0
    ends = torch.tensor([[[3, 5], [2, -1]]])
    inp = AdvantageInput(rewards=r, mask=mask, step_ends=ends, values=values)
    # V(prompt) = mean reward 0.5. seq 0: seg 0 (tokens 0-3) 0.75 - 0.5 = 0.25;
    #                                    seg 1 (tokens 4-5) 1 - 0.75 = 0.25
    # seq 1: one segment ending at its last token: 0 - 0.5 = -0.5
    adv, _ = ADVANTAGES.get("spo_chain")(inp)
    want = torch.tensor([[0.25] * 6, [-0.5, -0.5, -0.5, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)
    # probability mask: only tokens with p < 0.9 keep the segment advantage
    probs = torch.tensor([[[0.95, 0.5, 0.99, 0.3, 0.2, 0.97], [0.1, 0.95, 0.5, 0.1, 0.1, 0.1]]],
                         dtype=torch.float64)
    adv, _ = ADVANTAGES.get("spo_chain")(inp, logprobs=probs.log())
    want = torch.tensor([[0, 0.25, 0, 0.25, 0.25, 0], [-0.5, 0, -0.5, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(adv[0], want)


def test_spo_chain_equals_naive_loop_with_cutpoint_segments():
    g = torch.Generator().manual_seed(5)
    B, G, T = 2, 3, 9
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()
    lp = torch.log(torch.rand(B, G, T, generator=g).double())
    r = torch.randint(0, 2, (B, G), generator=g).double()
    values = torch.rand(B, G, T, generator=g).double()
    _, ends = cutpoints(lp, mask, threshold=0.5, max_segments=3)
    inp = AdvantageInput(rewards=r, mask=mask, step_ends=ends, values=values)
    adv, _ = ADVANTAGES.get("spo_chain")(inp, logprobs=lp, prob_threshold=0.5)
    for b in range(B):
        v0 = float(r[b].mean())
        for i in range(G):
            n = int(lengths[b, i])
            seg_ends = [int(e) for e in ends[b, i] if e >= 0]
            assert seg_ends[-1] == n - 1  # segments cover the completion
            start_v, start_t = v0, 0
            for e in seg_ends:
                end_v = float(r[b, i]) if e == n - 1 else float(values[b, i, e])
                for t in range(start_t, e + 1):
                    want = (end_v - start_v) if math.exp(float(lp[b, i, t])) < 0.5 else 0.0
                    assert float(adv[b, i, t]) == pytest.approx(want)
                start_v, start_t = end_v, e + 1
            assert torch.all(adv[b, i, n:] == 0)
