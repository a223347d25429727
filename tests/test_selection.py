"""Sample / token selection (catalogue D1-D3): dynamic sampling, D3S, PF-PPO."""
from __future__ import annotations

import itertools
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilt.registry import UnknownNameError
from tilt.selection import SELECTORS
from tilt.selection.d3s import d3s, d3s_schedule, max_variance_subset, top_tokens
from tilt.selection.dynamic_sampling import keep_groups, refill
from tilt.selection.pf_ppo import choose_strategy, pf_filter, r_squared


def test_selector_registry():
    assert {"dynamic_sampling", "d3s", "pf_ppo"} <= set(SELECTORS.names())
    assert SELECTORS.get("dynamic_sampling") is keep_groups
    with pytest.raises(UnknownNameError, match="d3s"):
        SELECTORS.get("dynamic")


# ----------------------------------------------------------------------------- D1 dynamic sampling

def test_keep_groups_hand_value():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2 + 1e-3]])
    # spreads 0, 1, 0, 1e-3 > 1e-6
    assert keep_groups(r).tolist() == [False, True, False, True]


def scripted_draws(groups):
    """draw_fn handing out the given groups in order, then uninformative all-zero groups."""
    queue, width = list(groups), len(groups[0])

    def draw(n):
        take, queue[:] = queue[:n], queue[n:]
        take = take + [[0] * width] * (n - len(take))
        return torch.tensor(take, dtype=torch.float32), [tuple(g) for g in take]

    return draw


def test_refill_hand_example_merges_draws():
    # batch of 2; draw 1 (n=2): [1,1] dropped, [0,1] kept; draw 2 (n=1): [0,0] dropped;
    # draw 3 (n=1): [1,0] kept -> done after 3 draws, 2 dropped
    draw = scripted_draws([[1, 1], [0, 1], [0, 0], [1, 0]])
    rewards, items, m = refill(draw, batch_size=2, max_draws=5)
    assert rewards.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert items == [(0, 1), (1, 0)]
    assert float(m["select/groups_dropped"]) == 2 and float(m["select/draws"]) == 3
    assert float(m["select/groups_dropped_frac"]) == pytest.approx(2 / 4)
    assert float(m["select/exhausted"]) == 0 and float(m["select/zero_var_returned"]) == 0


def test_refill_after_draw_limit_fills_with_dropped_and_reports():
    draw = scripted_draws([[1, 1], [0, 1], [0, 0]])
    rewards, items, m = refill(draw, batch_size=3, max_draws=2)
    # draw 1 (n=3): [1,1] x, [0,1] ok, [0,0] x; draw 2 (n=2): [0,0] [0,0] x -> limit spent
    assert float(m["select/exhausted"]) == 1.0
    assert rewards.shape == (3, 2) and rewards[0].tolist() == [0.0, 1.0]
    assert float(m["select/zero_var_returned"]) == 2
    short, _, m = refill(scripted_draws([[1, 1], [0, 1]]), batch_size=3, max_draws=1,
                         fill_with_dropped=False)
    assert short.tolist() == [[0.0, 1.0]] and float(m["select/zero_var_returned"]) == 0
    with pytest.raises(ValueError):
        refill(draw, batch_size=2, max_draws=0)


def test_refill_oversample_draws_more_and_discards_surplus():
    asked = []
    inner = scripted_draws([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 0], [0, 1]])

    def draw(n):
        asked.append(n)
        return inner(n)

    # batch of 3, oversample 1.5: draw 1 asks ceil(4.5) = 5 -> 2 kept, 3 dropped; draw 2 asks
    # ceil(1.5) = 2 -> both kept; 4 kept groups, the last one is discarded
    rewards, items, m = refill(draw, batch_size=3, max_draws=4, oversample=1.5)
    assert asked == [5, 2]
    assert items == [(0, 1), (1, 0), (0, 1)]
    assert float(m["select/draws"]) == 2 and float(m["select/groups_dropped"]) == 3
    # a surplus of kept groups is cut to the batch, in draw order
    rewards, items, _ = refill(scripted_draws([[0, 1], [1, 0], [0, 1], [1, 0]]), batch_size=2, max_draws=1,
                               oversample=2.0)
    assert items == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="oversample"):
        refill(draw, batch_size=2, max_draws=1, oversample=0.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1), min_size=3, max_size=3), min_size=1, max_size=30),
       st.integers(1, 5), st.integers(1, 6))
def test_refill_never_returns_zero_variance_group_while_limit_lasts(groups, batch_size, max_draws):
    rewards, items, m = refill(scripted_draws(groups), batch_size=batch_size, max_draws=max_draws)
    informative = keep_groups(rewards)
    if float(m["select/exhausted"]) == 0.0:
        assert rewards.shape[0] == batch_size and bool(informative.all())
    else:
        assert float(m["select/draws"]) == max_draws
        assert int((~informative).sum()) == int(m["select/zero_var_returned"])
        assert rewards.shape[0] == batch_size
    # informative groups come first, in draw order
    n_info = int(informative.sum())
    assert bool(informative[:n_info].all())
    assert items[:n_info] == [tuple(g) for g in groups if len(set(g)) > 1][:n_info]


# ----------------------------------------------------------------------------- D2 D3S

def test_max_variance_subset_hand_value():
    v = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    # k = 2: {0, 10} (var 25) beats every other pair
    assert max_variance_subset(v, 2)[0].tolist() == [True, False, False, True]
    # k = 3 candidates (j smallest + 3 - j largest): {1,2,10} 16.22, {0,2,10} 18.67,
    # {0,1,10} 20.22, {0,1,2} 0.67 -> {0, 1, 10}
    assert max_variance_subset(v, 3)[0].tolist() == [True, True, False, True]
    assert max_variance_subset(v, 4).all() and max_variance_subset(v, 9).all()


def test_max_variance_subset_equals_brute_force_for_small_groups():
    g = torch.Generator().manual_seed(0)
    for G in range(2, 11):
        for trial in range(3):
            if trial == 0:  # ties: binary rewards
                v = torch.randint(0, 2, (1, G), generator=g).double()
            else:
                v = torch.randn(1, G, generator=g).double()
            for k in range(1, G + 1):
                keep = max_variance_subset(v, k)[0]
                assert int(keep.sum()) == k
                chosen = statistics.pvariance([float(x) for x in v[0][keep]])
                best = max(statistics.pvariance([float(v[0, i]) for i in c])
                           for c in itertools.combinations(range(G), k))
                assert chosen == pytest.approx(best, abs=1e-12), (G, k, v)


def test_top_tokens_and_schedule_hand_values():
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7]], [[0.8, 0.2, 0.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1, 1, 1]], [[1.0, 1, 0, 0]]])
    # 6 valid tokens, keep ceil(0.5 * 6) = 3 best: 0.9, 0.8, 0.7 (padding never kept)
    keep = top_tokens(scores, mask, keep_frac=0.5)
    assert keep.tolist() == [[[False, True, False, True]], [[True, False, False, False]]]
    # linear relaxation: start 0.2 -> end 1 over 100 steps; step 50 -> 0.6, past the end -> 1
    assert d3s_schedule(50, total_steps=100, start=0.2) == pytest.approx(0.6)
    assert d3s_schedule(0, total_steps=100, start=0.2) == pytest.approx(0.2)
    assert d3s_schedule(500, total_steps=100, start=0.2) == pytest.approx(1.0)


def test_d3s_hand_value_both_levels():
    adv = torch.tensor([[[2.0, 2.0], [-1.0, -1.0], [0.5, 0.0], [-3.0, -3.0]]])  # [1, 4, 2]
    mask = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    ent = torch.tensor([[[1.0, 0.1], [1.0, 1.0], [1.0, 1.0], [0.2, 1.0]]])
    # step 0, sample_start 0.5 -> k = max(2, ceil(0.5 * 4)) = 2: seq advantages [2, -1, 0.5, -3]
    # -> max-variance pair {2, -3} = completions 0 and 3
    # token level on their 4 tokens, keep ceil(0.5 * 4) = 2 by |A| H: [2, 0.2, 0.6, 3] -> t(0,0), t(3,1)
    keep, tok, m = d3s(adv, mask, ent, step=0, total_steps=10)
    assert keep[0].tolist() == [True, False, False, True]
    assert tok[0].tolist() == [[True, False], [False, False], [False, False], [False, True]]
    assert float(m["select/samples_kept"]) == 0.5
    assert float(m["select/tokens_kept"]) == pytest.approx(2 / 7)  # 2 of the 7 valid tokens
    keep, tok, m = d3s(adv, mask, ent, step=10, total_steps=10)  # fully relaxed: keep all
    assert keep.all() and torch.equal(tok, mask > 0) and float(m["select/tokens_kept"]) == 1.0


# ----------------------------------------------------------------------------- D3 PF-PPO

def test_pf_filter_strategies_hand_values():
    r = torch.tensor([[0.2, 0.9, 0.5, 0.1]])
    assert pf_filter(r, strategy="best_of_n")[0][0].tolist() == [False, True, False, False]
    assert pf_filter(r, strategy="best_worst")[0][0].tolist() == [False, True, False, True]
    keep, m = pf_filter(r, strategy="all")
    assert keep.all() and float(m["select/samples_kept"]) == 1.0
    with pytest.raises(ValueError, match="strategy"):
        pf_filter(r, strategy="worst")


def test_pf_filter_best_random_keeps_best_plus_uniform_other():
    r = torch.tensor([[0.2, 0.9, 0.5, 0.1]]).expand(3000, 4)
    keep, m = pf_filter(r, strategy="best_random", generator=torch.Generator().manual_seed(0))
    assert keep[:, 1].all() and torch.all(keep.sum(1) == 2)
    freq = keep[:, [0, 2, 3]].double().mean(0)  # each other response ~ 1/3
    assert torch.all((freq - 1 / 3).abs() < 0.04)
    assert float(m["select/samples_kept"]) == pytest.approx(0.5)


def test_r_squared_hand_value_and_choose_strategy():
    # x = [1, 2, 3], y = [2, 4, 7]: dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]; sxy = 5, sxx = 2,
    # syy = 114/9 -> R^2 = 25 / (2 * 114 / 9) = 225 / 228
    r2 = r_squared(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 7]))
    assert float(r2) == pytest.approx(225 / 228)
    assert float(r_squared(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 3.0]))) == 0.0
    # the reward model is right on the best response and noisy below it -> best-of-N wins
    rewards = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.3, 0.2]])
    scores = torch.tensor([[0.9, 0.6, 0.5], [0.8, 0.9, 0.2]])
    name, r2 = choose_strategy(rewards, scores, generator=torch.Generator().manual_seed(0))
    assert name == "best_of_n" and r2["best_of_n"] == pytest.approx(1.0)
    assert r2["best_worst"] < 1.0
