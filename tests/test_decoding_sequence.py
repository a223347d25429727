"""E1 InfAlign calibrate-and-transform, E5 Q-Probe, E6 Q-guided best-first step search."""
import math

import pytest
import torch

from tilt.decoding.infalign import calibrate_rewards, ctrl_reward, transform_calibrated
from tilt.decoding.qprobe import fit_probe, probe_select
from tilt.decoding.search import best_first_search
from tilt.exact import make_tree, resample_probs, sequence_probs
from tilt.tasks.addition_steps import AdditionStepsTask, split_steps


def test_calibration_is_the_reference_win_rate_by_hand():
    ref = torch.tensor([[0.0, 1.0, 1.0, 2.0]])
    r = torch.tensor([[1.0, 3.0, -1.0]])
    # r=1: below {0} = 1/4, ties {1, 1} = 2/4 -> 1/4 + .5 * 2/4 = .5; r=3: 4/4 = 1; r=-1: 0
    assert torch.allclose(calibrate_rewards(r, ref), torch.tensor([[0.5, 1.0, 0.0]]))
    # bon transform exp(t C), t = 2: (e^1, e^2, 1); won: -exp(-2C) = (-e^-1, -e^-2, -1)
    assert torch.allclose(ctrl_reward(r, ref, kind="bon", t=2.0), torch.tensor([[math.e, math.e ** 2, 1.0]]))
    assert torch.allclose(ctrl_reward(r, ref, kind="won", t=2.0), -torch.tensor([[math.exp(-1), math.exp(-2), 1.0]]))
    assert torch.allclose(transform_calibrated(torch.tensor([0.3]), kind="identity"), torch.tensor([0.3]))


def test_calibration_invariant_to_monotone_reward_changes():
    gen = torch.Generator().manual_seed(0)
    r, ref = torch.randn(3, 5, generator=gen), torch.randn(3, 7, generator=gen)
    assert torch.equal(calibrate_rewards(r, ref), calibrate_rewards(2 * r.exp() + 1, 2 * ref.exp() + 1))


def test_infalign_bad_input():
    with pytest.raises(ValueError, match="same B"):
        calibrate_rewards(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="valid: bon, won, identity"):
        transform_calibrated(torch.zeros(1), kind="max")


def test_q_probe_fits_rewards_and_its_sampler_has_the_closed_form_law():
    tree, beta, k = make_tree(), 0.3, 3
    p = sequence_probs(tree, torch.softmax(tree.ref_logits, -1))[0]  # [9]
    features = torch.eye(9, dtype=torch.float64)  # one-hot embedding of each sequence
    w = fit_probe(features, tree.enumerate().rewards, l2=1e-9)
    assert torch.allclose(w, tree.enumerate().rewards, atol=1e-6)  # one-hot ridge recovers r
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.expand(40000, 9), k, replacement=True, generator=gen)  # [40000, k]
    chosen = draws.gather(1, probe_select(w[draws], beta=beta, generator=gen)[:, None]).squeeze(1)
    empirical = torch.bincount(chosen, minlength=9).double() / 40000
    closed = resample_probs(p, w, beta=beta, k=k)
    assert 0.5 * (empirical - closed).abs().sum() < 0.01  # MC error ~ sqrt(9 / 40000) / 2 = .0075 worst case


def test_best_first_search_with_exact_q_finds_the_best_path():
    tree = make_tree(depth=3, vocab=3, seed=4)
    q = tree.soft_q(1e-4)  # beta -> 0: Q(s, a) = the best reward reachable after a
    best = int(tree.rewards.reshape(-1).argmax())
    target = tuple((best // 3 ** e) % 3 for e in (2, 1, 0))

    def score(prefix):
        return 0.0 if not prefix else q[tree.state_index(prefix[:-1]), prefix[-1]].item()

    found, used = best_first_search((), expand=lambda pre: [pre + (a,) for a in range(3)], score=score,
                                    is_terminal=lambda pre: len(pre) == 3, max_expansions=50)
    assert found == target and used == 3  # root, then one expansion per level


def _addition_search():
    task = AdditionStepsTask()
    a, b, n = 47, 85, 2  # reference "2c1,3c1>132"

    def expand(text):
        steps, _ = split_steps(text)
        written = 0 if not text else len(steps)
        if written < n:
            sep = "," if text else ""
            return [text + sep + f"{d}c{c}" for c in (0, 1) for d in range(10)]
        digits = [int(s[0][0]) for s in steps]
        implied = sum(d * 10 ** i for i, d in enumerate(digits)) + int(steps[-1][0][-1]) * 10 ** n
        return [text + f">{v}" for v in (implied - 1, implied, implied + 1)]

    def score(text):  # step-level Q: 1 while every written step is right (process reward), + depth bonus
        if not text:
            return 0.0
        steps, answer = split_steps(text)
        written = len(steps) + (answer is not None)
        ok = all(x == 1.0 for x in task.step_rewards(text, a=a, b=b)[:written])
        return float(ok) + 0.01 * written

    terminal = lambda text: split_steps(text)[1] is not None  # noqa: E731
    return best_first_search("", expand=expand, score=score, is_terminal=terminal, max_expansions=20)


def test_q_guided_step_search_solves_addition_steps():
    found, used = _addition_search()
    # root -> "2c1" -> "2c1,3c1" -> answer popped: 3 expansions, 20 + 20 + 3 children generated
    assert found == "2c1,3c1>132" and used == 3
    assert AdditionStepsTask().verify(found, a=47, b=85) == 1.0


def test_search_budget_and_bad_input():
    found, used = best_first_search(0, expand=lambda x: [x + 1], score=float, is_terminal=lambda x: x > 10,
                                    max_expansions=5)
    assert found is None and used == 5
    with pytest.raises(ValueError, match="max_expansions"):
        best_first_search(0, expand=lambda x: [], score=float, is_terminal=bool, max_expansions=0)
