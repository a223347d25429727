"""B4 HAEPO and B8 A*-PO: hand-computed values and the A*-PO fixed point."""
import dataclasses
import math

import pytest
import torch

from tilt.exact.solve import single_thread
from tilt.batch import PolicyLossInput
from tilt.exact import (Bandit, TokenTree, make_bandit, make_tree, optimal_policy, policy_input, sequence_probs, solve,
                        tilted_distribution, total_variation)
from tilt.losses import LOSSES
from tilt.losses.trajectory import astar_v_star, group_softmax
from tilt.reduction import reduce_tokens, reduction_denominator
from loss_helpers import reduced_loss as _loss

D = torch.float64
L = math.log
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)




def _haepo_inp():
    logp = torch.tensor([[L(0.5), L(0.5)], [L(0.5), -40.0]], dtype=D).requires_grad_(True)  # row1 token 2 padding
    return PolicyLossInput(
        logp=logp, old_logp=logp.detach(), advantages=torch.tensor([[1.0, 1.0], [-1.0, 7.0]], dtype=D), mask=MASK,
        group_index=torch.tensor([0, 0]), entropy=torch.tensor([[0.7, 0.5], [0.6, 99.0]], dtype=D),
        prev_logp=torch.tensor([[L(0.25), L(0.5)], [L(0.5), 3.0]], dtype=D))


def test_group_softmax_is_per_group():
    # groups {0, 1}, {2}: softmax(ln 1, ln 3) = (.25, .75) ; singleton -> 1
    w = group_softmax(torch.tensor([0.0, L(3.0), 5.0], dtype=D), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75, 1.0], dtype=D))


def test_haepo_plackett_luce_term_value_and_gradient():
    # L_0 = ln .5 + ln .5 = ln .25 ; L_1 = ln .5 -> w = (.25, .5) / .75 = (1/3, 2/3) ; R~ = (+1, -1)
    # group loss -sum w R~ = -(1/3 - 2/3) = 1/3 ; per sequence -|g| w R~ = (-2/3, 4/3), mean 1/3
    inp = _haepo_inp()
    loss, _ = _loss("haepo", inp, entropy_coef=0.0, kl_coef=0.0)
    assert loss.item() == pytest.approx(1 / 3, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, inp.logp)
    # d/dL_j = -w_j (R_j - sum_k w_k R_k), sum w R = -1/3: j=0 -(1/3)(4/3) = -4/9 ; j=1 -(2/3)(-2/3) = 4/9
    torch.testing.assert_close(grad, torch.tensor([[-4 / 9, -4 / 9], [4 / 9, 0.0]], dtype=D))


def test_haepo_entropy_and_prev_kl_terms():
    # entropy: -.1 (.7 + .5 + .6) / 2 = -.09
    # k3 to pi_prev: log rho = ln(.25/.5) = -ln 2 -> .5 - 1 + ln 2 = .193147 (other tokens 0)
    #   .1 * .193147 / 2 = .009657
    # total 1/3 - .09 + .009657 = 0.252991
    loss, metrics = _loss("haepo", _haepo_inp(), entropy_coef=0.1, kl_coef=0.1)
    assert loss.item() == pytest.approx(1 / 3 - 0.09 + 0.1 * (0.5 - 1 + L(2)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.252991, abs=1e-6)
    assert metrics["kl/prev_k3"].item() == pytest.approx((0.5 - 1 + L(2)) / 2)


def test_astar_v_star_value():
    # beta = 1: log mean(e^1, e^0) = log((2.718282 + 1) / 2) = log 1.859141 = 0.620115 ; log mean(1, 1) = 0
    v = astar_v_star(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D), beta=1.0)
    torch.testing.assert_close(v, torch.tensor([L((math.e + 1) / 2), 0.0], dtype=D))
    assert v[0].item() == pytest.approx(0.620115, abs=1e-6)
    # small beta -> max: .01 * log((e^100 + 1) / 2) = 1 + .01 log(1/2) + tiny = 0.993069 (no overflow)
    assert astar_v_star(torch.tensor([[1.0, 0.0]], dtype=D), beta=0.01).item() == pytest.approx(0.993069, abs=1e-6)


def test_astar_v_star_equals_exact_soft_value_for_uniform_reference():
    """M samples that cover a uniform pi_ref once each make the stage-1 estimate exact."""
    bandit = Bandit(rewards=torch.tensor([[0.2, 0.9, 0.4]], dtype=D), ref_logits=torch.zeros(1, 3, dtype=D))
    torch.testing.assert_close(astar_v_star(bandit.rewards, beta=0.3), bandit.soft_value(0.3))


def test_astar_po_value_and_gradient():
    # log pi/pi_ref: row0 (ln .5 - ln .25) * 2 = 2 ln 2 = 1.386294 ; row1 0
    # residual = beta log-ratio - (r - V*): row0 .5 * 1.386294 - (1 - .4) = .093147 ; row1 0 - (0 - .2) = .2
    # mean of squares (.008676 + .04) / 2 = 0.024338
    logp = torch.tensor([[L(0.5), L(0.5)], [L(0.5), 9.0]], dtype=D).requires_grad_(True)
    inp = PolicyLossInput(logp=logp, old_logp=logp.detach(), advantages=torch.zeros(2, 2, dtype=D), mask=MASK,
                          ref_logp=torch.tensor([[L(0.25), L(0.25)], [L(0.5), -9.0]], dtype=D),
                          rewards=torch.tensor([1.0, 0.0], dtype=D), baseline_v=torch.tensor([0.4, 0.2], dtype=D))
    loss, _ = _loss("astar_po", inp, beta=0.5)
    r0 = 0.5 * 2 * L(2) - 0.6
    assert loss.item() == pytest.approx((r0**2 + 0.04) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.024338, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp_t = 2 residual beta / N: row0 .093147 * .5 = .046574 ; row1 .2 * .5 = .1
    torch.testing.assert_close(grad, torch.tensor([[r0 * 0.5, r0 * 0.5], [0.1, 0.0]], dtype=D))


# ------------------------------------------------------------------ fixed points (exact harness)

BETA = 0.5


def test_astar_po_reaches_tilted_optimum():
    """The regression target beta log pi/pi_ref = r - V* is met exactly by pi_ref exp(r/beta)/Z
    when V* is the soft value (arXiv:2505.20686, stage 2); bandit and token tree (where the
    harness supplies the exact V*(x) as ``baseline_v``)."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    p = solve("astar_po", bandit, beta=BETA, steps=60, lr=0.3)
    assert total_variation(p, optimal_policy(bandit, BETA)) < 0.02
    tree = make_tree(depth=2, vocab=3, seed=0)
    p = solve("astar_po", tree, beta=BETA, steps=60, lr=0.3)
    assert total_variation(sequence_probs(tree, p), tilted_distribution(tree, BETA)) < 0.02


def test_astar_po_two_stages_reach_tilted_optimum():
    """Stage 1 (``astar_v_star`` on reference samples covering a uniform pi_ref) then stage 2:
    the pipeline as a user runs it reaches pi_ref exp(r/beta) / Z."""
    base = make_bandit(n_prompts=2, n_answers=4, seed=2)
    bandit = Bandit(rewards=base.rewards, ref_logits=torch.zeros_like(base.ref_logits))
    v_star = astar_v_star(bandit.rewards, beta=BETA)  # [X] from the offline reference samples
    group = bandit.enumerate().group
    astar = LOSSES.get("astar_po")

    def with_stage1(inp):
        return astar(dataclasses.replace(inp, baseline_v=v_star[group]), beta=BETA)

    p = solve(with_stage1, bandit, beta=BETA, steps=60, lr=0.3, mode="seq-mean-token-sum")
    assert total_variation(p, optimal_policy(bandit, BETA)) < 0.02


# ------------------------------------------------------------------ HAEPO property (exact harness)

one_thread = single_thread  # scoped single intra-op thread for loops of tiny ops


def _haepo_group_objective(problem, logits):
    """HAEPO's Plackett-Luce term with one group per prompt that lists every trajectory once
    (the exact harness's enumeration), exact advantages R~ = r - E_pi[r], reduced as registered."""
    inp, _ = policy_input(problem, logits)
    per_token, _ = LOSSES.get("haepo")(inp, entropy_coef=0.0, kl_coef=0.0)
    mode = LOSSES.entry("haepo").meta["reduction"]
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=reduction_denominator(inp.mask, mode)), inp


@pytest.mark.parametrize("problem", [make_bandit(n_prompts=2, n_answers=4, seed=4),
                                     make_tree(depth=2, vocab=3, seed=5)], ids=["bandit", "tree"])
def test_haepo_plackett_luce_weights_are_trajectory_probabilities(problem):
    """w_k = softmax_k(L_k) with L_k = sum_t log pi(y_t^k) (steps 1-2 of HAEPO, arXiv:2508.18884):
    over a group that lists every trajectory of a prompt once, sum_j exp(L_j) = 1, so w_k = pi(y_k)."""
    logits = problem.ref_logits + torch.randn(problem.ref_logits.shape, generator=torch.Generator().manual_seed(1),
                                              dtype=D)
    inp, _ = policy_input(problem, logits)
    w = group_softmax(inp.logp.sum(-1), inp.group_index)  # [N]
    x = problem.enumerate().n_prompts
    torch.testing.assert_close(w.reshape(x, -1), sequence_probs(problem, torch.softmax(logits, -1)))


def _tree_with_isolated_best_leaf():
    """make_tree(seed=5) with leaf (0, 1) raised to 1.0: the best trajectory starts with 40% of
    its group's weight on other branches and only 0.04 on itself, and its branch's mean is lower."""
    base = make_tree(depth=2, vocab=3, seed=5)
    rewards = base.rewards.clone()
    rewards[0, 1] = 1.0
    return TokenTree(depth=2, vocab=3, rewards=rewards, ref_logits=base.ref_logits)


@pytest.mark.parametrize("problem", [make_bandit(n_prompts=2, n_answers=4, seed=4),
                                     _tree_with_isolated_best_leaf()], ids=["bandit", "tree"])
def test_haepo_weights_concentrate_on_the_best_trajectory(problem):
    """HAEPO's claimed behaviour without its regularisers: minimising -sum_k w_k R~_k moves the
    Plackett-Luce weights onto the highest-return trajectory of each group. With every trajectory
    listed once, w_k = pi(y_k) and the gradient is the exact policy gradient of E_pi[r], whose
    only stable point puts all mass on argmax r; after 150 Adam steps the best trajectory's
    weight exceeds 0.98 in every group (rewards are distinct, so the argmax is unique). The tree's
    best leaf sits in a branch with a lower mean, so a greedy branch choice would fail."""
    logits = problem.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.3)
    with one_thread():
        for _ in range(150):
            opt.zero_grad()
            _haepo_group_objective(problem, logits)[0].backward()
            opt.step()
    _, inp = _haepo_group_objective(problem, logits.detach())
    w = group_softmax(inp.logp.sum(-1), inp.group_index)  # [N]
    rewards = problem.enumerate().rewards.reshape(problem.enumerate().n_prompts, -1)  # [X, Y]
    best = rewards.argmax(-1)  # [X]
    assert w.reshape(rewards.shape).gather(-1, best[:, None]).min() > 0.98
