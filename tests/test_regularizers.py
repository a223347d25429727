"""A3-A7 regularisers: Tsallis PG, AKL, AER, Lp-Reg, critical-token KL fixed point."""
import copy
import dataclasses
import functools
import math

import pytest
import torch

from tilt.exact.solve import single_thread
from tilt.batch import PolicyLossInput
from tilt.config import load_config
from tilt.exact import (
    exact_expectation,
    exact_gradient,
    group_mean,
    make_bandit,
    make_tree,
    per_state_fixed_point,
    sequence_probs,
    solve,
    state_visit_probs,
    tilted_distribution,
    total_variation,
    tsallis_optimum,
    tsallis_tilt,
)
from tilt.kl import critical, reference_certainty, tsallis_kl
from tilt.learner import Learner, LearnerBatch
from tilt.losses import LOSSES, regularizers
from tilt.losses.regularizers import (
    AERState,
    aer_per_token,
    aer_prompt_coefficients,
    aer_update,
    akl,
    akl_weights,
    group_accuracy,
    lowest_fraction,
    lp_reg_penalty,
    lp_reg_selection,
    minp_proxy_logp,
)
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate
from tilt.providers import StepData
from tilt.providers.lp_select import LowProbabilitySelection
from tilt.wiring.resolve import resolve
from tilt.reduction import reduce_tokens, reduction_denominator

D = torch.float64
LOG = math.log


def _one(logp=0.5, old=0.25, ref=0.4, adv=2.0):
    return PolicyLossInput(logp=torch.tensor([[LOG(logp)]], dtype=D, requires_grad=True),
                           old_logp=torch.tensor([[LOG(old)]], dtype=D), advantages=torch.tensor([[adv]], dtype=D),
                           mask=torch.ones(1, 1, dtype=D), ref_logp=torch.tensor([[LOG(ref)]], dtype=D))


def _random(n=3, t=4, v=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=gen, dtype=D)
    tok = torch.randint(0, v, (n, t), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
    mask = torch.ones(n, t, dtype=D)
    mask[0, 2:] = 0
    return PolicyLossInput(
        logp=logp, old_logp=logp.detach() - 0.1 * torch.rand(n, t, generator=gen, dtype=D),
        advantages=torch.randn(n, 1, generator=gen, dtype=D).expand(n, t).clone(), mask=mask,
        ref_logp=-torch.rand(n, t, generator=gen, dtype=D) * 2, rewards=torch.tensor([1.0, 0.0, 1.0], dtype=D)[:n],
        group_index=torch.tensor([0, 0, 1])[:n], entropy=torch.rand(n, t, generator=gen, dtype=D),
        logits=logits, teacher_logits=torch.randn(n, t, v, generator=gen, dtype=D),
    )


one_thread = single_thread  # scoped single intra-op thread for loops of tiny ops


def _reduced(name, inp, **kw):
    per_token, _ = LOSSES.get(name)(inp, **kw)
    mode = LOSSES.entry(name).meta["reduction"]
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=reduction_denominator(inp.mask, mode))


def _pad(inp, pad=2):
    """Append ``pad`` masked columns of garbage to every [N, T] / [N, T, V] field."""
    def cat(x, val):
        if not torch.is_tensor(x) or x.dim() < 2:  # None, [N] fields, extras
            return x
        extra = torch.full(x.shape[:1] + (pad,) + x.shape[2:], val, dtype=x.dtype)
        return torch.cat([x, extra], 1)
    fields = {k: cat(v, 3.0) for k, v in inp.__dict__.items() if k not in ("mask",)}
    fields["mask"] = torch.cat([inp.mask, torch.zeros(inp.mask.shape[0], pad, dtype=D)], 1)
    return PolicyLossInput(**fields)


# ---------------------------------------------------------------- A3 Tsallis policy loss
def test_tsallis_pg_hand_value():
    # w = 0.5/0.25 = 2, pi_ref/pi = 0.8, -ln_2(0.8) = 1/0.8 - 1 = 0.25, f = 2 * 0.25 = 0.5
    # loss = -2*2 + 0.1*0.5 = -3.95
    per_token, _ = LOSSES.get("tsallis_pg")(_one(), beta=0.1, q=2.0)
    assert per_token.item() == pytest.approx(-3.95)


def test_tsallis_pg_q1_is_rpg_rkl():
    inp = _random()
    inp.logp = inp.logp.clone().requires_grad_(True)
    a, _ = LOSSES.get("tsallis_pg")(inp, beta=0.3, q=1.0)
    b, _ = LOSSES.get("rpg_rkl")(inp, beta=0.3)
    assert torch.allclose(a, b, atol=1e-14)


PROBLEMS = {"bandit": make_bandit(n_prompts=2, n_answers=4, seed=5), "tree": make_tree(depth=2, vocab=3, seed=6)}


@pytest.mark.parametrize("problem_name", ["bandit", "tree"])
def test_tsallis_pg_expected_gradient_is_objective_gradient(problem_name):
    """Sequence level: E_old[grad loss] = -grad (E_pi[r] - beta D_q(pi || pi_ref)), off-policy too."""
    problem, beta, q = PROBLEMS[problem_name], 0.4, 2.0
    gen = torch.Generator().manual_seed(8)
    logits = problem.ref_logits + torch.randn(problem.ref_logits.shape, generator=gen, dtype=D)
    old = logits + 0.3 * torch.randn(logits.shape, generator=gen, dtype=D)
    grad = exact_gradient("tsallis_pg", logits, problem, old_logits=old,
                          loss_kwargs=dict(beta=beta, q=q, level="sequence"))
    table = logits.clone().requires_grad_(True)
    seq = sequence_probs(problem, torch.softmax(table, -1))  # [X, Y]
    ref = sequence_probs(problem, torch.softmax(problem.ref_logits, -1))
    e = problem.enumerate()
    px = e.prompt_prob.reshape(seq.shape)[:, 0]
    d_q = tsallis_kl(seq.log(), ref.log(), q=q)  # [X]
    objective = (px * ((seq * e.rewards.reshape(seq.shape)).sum(-1) - beta * d_q)).sum()
    (expected,) = torch.autograd.grad(-objective, table)
    assert torch.allclose(grad, expected, atol=1e-10)


@pytest.mark.parametrize("problem_name", ["bandit", "tree"])
def test_tsallis_pg_reaches_tsallis_fixed_point(problem_name):
    """q = 2: argmax E[r] - beta D_2(pi || pi_ref) (a chi^2 penalty) is pi = pi_ref u, u linear in
    r (tsallis_tilt, KKT closed form up to the 1-D root), not the softmax tilt."""
    problem, beta = PROBLEMS[problem_name], 0.5
    target = tsallis_optimum(problem, beta, q=2.0)
    assert target.min() > 0  # interior optimum, reachable by a softmax table
    probs = solve("tsallis_pg", problem, beta=beta, q=2.0, level="sequence", steps=250, lr=0.15)
    seq = sequence_probs(problem, probs)
    assert total_variation(seq, target) < 1e-3  # catalogue tolerance 0.02
    assert total_variation(seq, tilted_distribution(problem, beta)) > 1e-2


def test_tsallis_pg_q1_reaches_tilted_optimum_and_token_level_per_state_point():
    """q = 1 is the reverse KL: tilted optimum. Token level on the tree: per-state D_2 fixed point."""
    tree, beta = PROBLEMS["tree"], 0.5
    probs = solve("tsallis_pg", tree, beta=beta, q=1.0, level="sequence", steps=250, lr=0.15)
    assert total_variation(sequence_probs(tree, probs), tilted_distribution(tree, beta)) < 1e-3
    probs = solve("tsallis_pg", tree, beta=beta, q=2.0, level="token", steps=300, lr=0.15)
    target = per_state_fixed_point(tree, beta, divergence="tsallis", q=2.0)
    assert total_variation(sequence_probs(tree, probs), sequence_probs(tree, target)) < 1e-3


def test_tsallis_tilt_hand_value():
    # uniform p_ref over 2, v = (0, 1), beta = 1, q = 2: u = (1 + (v - lambda))/2 with
    # sum p_ref u = 1 -> lambda = 0.5, p = 0.5 * (0.75, 1.25) = (0.375, 0.625)
    p = tsallis_tilt(torch.log(torch.tensor([0.5, 0.5], dtype=D)), torch.tensor([0.0, 1.0], dtype=D), 1.0, q=2.0)
    assert torch.allclose(p, torch.tensor([0.375, 0.625], dtype=D), atol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tsallis_pg_padding_masking_gradcheck(level):
    inp = _random()
    value = _reduced("tsallis_pg", inp, beta=0.2, q=1.5, level=level)
    assert torch.allclose(_reduced("tsallis_pg", _pad(inp), beta=0.2, q=1.5, level=level), value, atol=1e-12)
    x = inp.logp.clone().requires_grad_(True)
    def f(lp):
        return LOSSES.get("tsallis_pg")(PolicyLossInput(**dict(inp.__dict__, logp=lp)), beta=0.2, q=1.5, level=level)[0]

    assert torch.autograd.gradcheck(f, (x,))


# ---------------------------------------------------------------- A4 AKL
def test_akl_hand_values():
    # teacher p = (.6,.3,.1), student q = (.2,.5,.3), mu = .5: head = {top token} (mass before it 0,
    # before the second .6 >= .5). g_head = |.6-.2| = .4, g_tail = .2 + .2 = .4 -> weights (.5, .5)
    # FKL = .6 ln 3 + .3 ln .6 + .1 ln(1/3) = .659167 - .153248 - .109861 = 0.396058
    # RKL = .2 ln(1/3) + .5 ln(5/3) + .3 ln 3 = -.219722 + .255413 + .329584 = 0.365274
    # AKL = .5 * .396058 + .5 * .365274 = 0.380666; mu = .7: head = first two, g_head = .6,
    # g_tail = .2 -> (.75, .25), AKL = .75*.396058 + .25*.365274 = 0.388362
    p = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]], dtype=D))
    q = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]], dtype=D))
    w_head, w_tail = akl_weights(q, p, mu=0.5)
    assert (w_head.item(), w_tail.item()) == pytest.approx((0.5, 0.5))
    assert akl(q, p, mu=0.5).item() == pytest.approx(0.380666, abs=1e-6)
    assert akl(q, p, mu=0.7).item() == pytest.approx(0.388362, abs=1e-6)


def test_akl_zero_at_teacher_and_weights_are_stop_gradient():
    inp = _random()
    assert torch.allclose(akl(inp.teacher_logits, inp.teacher_logits), torch.zeros(3, 4, dtype=D), atol=1e-12)
    theta = inp.logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(akl(theta, inp.teacher_logits).sum(), theta)
    w_head, w_tail = akl_weights(inp.logits, inp.teacher_logits)
    th2 = inp.logits.clone().requires_grad_(True)
    lq, lp = torch.log_softmax(th2, -1), torch.log_softmax(inp.teacher_logits, -1)
    manual = (w_head * (lp.exp() * (lp - lq)).sum(-1) + w_tail * (lq.exp() * (lq - lp)).sum(-1)).sum()
    (g2,) = torch.autograd.grad(manual, th2)
    assert torch.allclose(g, g2, atol=1e-12) and torch.isfinite(g).all()


def test_akl_distill_padding_and_masking():
    inp = _random()
    value = _reduced("akl_distill", inp, mu=0.5)
    assert torch.allclose(_reduced("akl_distill", _pad(inp), mu=0.5), value, atol=1e-12)
    per_token, _ = LOSSES.get("akl_distill")(inp)
    alone = akl(inp.logits[:1, :2], inp.teacher_logits[:1, :2])
    assert torch.allclose(per_token[:1, :2], alone, atol=1e-14)


def test_akl_distill_reaches_teacher_fixed_point():
    """Both KLs vanish only at student = teacher, so AKL distillation's fixed point is the teacher."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=9)
    teacher = torch.randn(bandit.ref_logits.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    probs = solve("akl_distill", bandit, beta=0.0, teacher_logits=teacher, steps=250, lr=0.1)
    assert total_variation(probs, torch.softmax(teacher, -1)) < 1e-3


# ---------------------------------------------------------------- A5 AER
def test_aer_update_hand_values():
    # H_0 = 2.0 recorded, target 0.4 * 2 = 0.8: alpha = 0.01 + 0.1*(0.8 - 2.0) = -0.11 -> 0
    s = aer_update(AERState(alpha=0.01), 2.0, tau=0.4, lr=0.1)
    assert s == AERState(alpha=0.0, initial_entropy=2.0)
    # then H = 0.5: alpha = 0 + 0.1*(0.8 - 0.5) = 0.03, anchor unchanged
    s = aer_update(s, 0.5, tau=0.4, lr=0.1)
    assert s.alpha == pytest.approx(0.03) and s.initial_entropy == 2.0
    assert aer_update(s, 0.0, tau=0.4, lr=10.0, alpha_max=0.5).alpha == 0.5


def test_aer_prompt_coefficients_and_group_accuracy_hand_values():
    # alpha = .2, rho = .6, acc = (0, .25, .5, 1) -> .2*(1, .75, .5, 0) = (.2, .15, .1, 0)
    acc = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=D)
    expected = torch.tensor([0.2, 0.15, 0.1, 0.0], dtype=D)
    assert torch.allclose(aer_prompt_coefficients(acc, alpha=0.2, rho=0.6), expected)
    # groups {0: (1, 0)}, {1: (1,)} -> (.5, .5, 1)
    acc2 = group_accuracy(torch.tensor([1.0, 0.0, 1.0], dtype=D), torch.tensor([0, 0, 1]))
    assert acc2.tolist() == [0.5, 0.5, 1.0]


def test_aer_loss_hand_value():
    # on-policy ratio 1: loss = -A - lambda_i H; group 0 acc .5 -> lambda = .1*(1-.5) = .05
    inp = _random()
    inp.old_logp = inp.logp.detach()
    per_token, _ = LOSSES.get("aer")(inp, alpha=0.1, rho=1.0)
    lam = torch.tensor([0.05, 0.05, 0.0], dtype=D)  # group 1 acc 1 -> 0
    assert torch.allclose(per_token, -inp.advantages - lam[:, None] * inp.entropy, atol=1e-12)
    assert torch.allclose(_reduced("aer", _pad(inp), alpha=0.1), _reduced("aer", inp, alpha=0.1), atol=1e-12)


def test_aer_controller_holds_entropy_at_anchored_target():
    """Closed loop on one categorical: maximise E[r] + alpha H with alpha from aer_update; the
    entropy settles at tau * H_0 (the anchored target)."""
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(5, generator=gen, dtype=D)
    theta = torch.zeros(5, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    state = AERState(alpha=0.0)
    for _ in range(800):
        p = torch.softmax(theta, -1)
        h = -(p * p.log()).sum()
        state = aer_update(state, h.item(), tau=0.5, lr=0.05)
        opt.zero_grad()
        (-(p * r).sum() - state.alpha * h).backward()
        opt.step()
    assert h.item() == pytest.approx(0.5 * math.log(5), abs=0.01)
    assert state.alpha > 0


def test_aer_closed_loop_on_exact_bandit_holds_anchored_target_entropy():
    """AER's property (components ii + iii, arXiv:2510.10959): with the global coefficient driven
    by aer_update, training settles at the initial-anchored target H* = tau * H_0. Exact harness:
    every step takes Adam on the exact expected AER loss (PPO-clip on-policy, exact advantages
    r - E_pi[r]) with the difficulty-aware coefficients of the infinite group,
    lambda_x = alpha (1 - E_pi[r | x]); the logged entropy is sum_x p(x) H(pi(.|x)), the
    ``entropy`` metric of the trainer. tau = 0.5 is below 1, so the target is reachable."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=3)
    enum = bandit.enumerate()
    logits = bandit.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    state, tau = AERState(alpha=0.0), 0.5
    with one_thread():
        h = _aer_closed_loop(bandit, enum, logits, opt, state, tau)
    assert h[0] == pytest.approx(tau * h[1].initial_entropy, abs=0.02)
    assert h[1].alpha > 0  # the regulariser is active at the fixed point (plain PG would collapse H)


def _aer_closed_loop(bandit, enum, logits, opt, state, tau):
    """400 Adam steps of the exact AER loss with aer_update between them; (entropy, state)."""
    for _ in range(400):
        probs = torch.softmax(logits.detach(), -1)  # [X, K]
        h = float((bandit.prompt_probs * -(probs * probs.log()).sum(-1)).sum())
        state = aer_update(state, h, tau=tau, lr=0.05, alpha_max=10.0)

        def loss(inp):
            w = enum.prompt_prob * torch.exp(inp.old_logp.sum(-1))  # [N] sampling weights
            acc = group_mean(inp.rewards, w, enum)  # [N] E_pi[r | x]
            return aer_per_token(inp, aer_prompt_coefficients(acc, alpha=state.alpha))

        opt.zero_grad()
        exact_expectation(loss, logits, bandit, mode="token-mean").backward()
        opt.step()
    return h, state


# ---------------------------------------------------------------- A6 Lp-Reg
def test_minp_proxy_hand_values():
    # pi = (.5,.3,.15,.05), min_p = .2: minp cut .2*.5 = .1 keeps {0,1,2} (mass .95):
    # token 1 -> log(.3/.95) = -1.152680, token 3 -> -inf; fixed cut .2 keeps {0,1} (mass .8):
    # token 1 -> log(.3/.8) = -0.980829
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]], dtype=D)).expand(1, 2, 4)
    logp = torch.log(torch.tensor([[0.3, 0.05]], dtype=D))
    out = minp_proxy_logp(logits, logp, min_p=0.2)
    assert out[0, 0].item() == pytest.approx(-1.152680, abs=1e-6) and out[0, 1].item() == -math.inf
    fixed = minp_proxy_logp(logits, logp, min_p=0.2, mode="fixed")
    assert fixed[0, 0].item() == pytest.approx(-0.980829, abs=1e-6)


def test_lowest_fraction_hand_value():
    # values (3, 1, 2, 5), token 1 ineligible; frac .5 of 3 eligible -> int(1.5) = 1 (as the
    # reference's int(n * k_percent)): the smallest eligible, value 2 ; frac 1 -> all 3 eligible
    values, eligible = torch.tensor([[3.0, 1.0, 2.0, 5.0]]), torch.tensor([[True, False, True, True]])
    assert lowest_fraction(values, eligible, 0.5).tolist() == [[False, False, True, False]]
    assert lowest_fraction(values, eligible, 1.0).tolist() == [[True, False, True, True]]
    assert not lowest_fraction(values, eligible, 0.3).any()  # int(0.9) = 0


def test_lp_reg_selection_hand_value_and_masking():
    # row 0 (A = -1): probs .1 .2 [masked .001] .3 .4 ; row 1 (A = +1): .05 .6 [masked .001] .7 .8
    # neg_frac .5 of 4 valid negatives -> 2 lowest: .1, .2 ; pos_frac .25 of 4 valid positives
    # -> int(1.0) = 1 lowest: .05 (the masked .001 columns are never eligible)
    logp = torch.log(torch.tensor([[0.1, 0.2, 0.001, 0.3, 0.4], [0.05, 0.6, 0.001, 0.7, 0.8]], dtype=D))
    adv = torch.tensor([[-1.0] * 5, [1.0] * 5], dtype=D)
    mask = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 0, 1, 1]], dtype=D)
    pick = lp_reg_selection(logp, adv, mask, neg_frac=0.5, pos_frac=0.25)
    assert pick.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    # masked == selected-only: dropping the masked column selects the same tokens
    keep = [0, 1, 3, 4]
    assert torch.equal(lp_reg_selection(logp[:, keep], adv[:, keep], mask[:, keep], neg_frac=0.5, pos_frac=0.25),
                       pick[:, keep])


def test_lp_reg_penalty_hand_value_and_direction():
    # token 0: pi = .3, proxy .3/.95 -> rho = 1/.95 = 1.052632, k3 = .052632 - log 1.052632 = 0.001338
    # token 1: filtered (proxy -inf) -> 0 ; token 2: not a candidate -> 0
    logp = torch.log(torch.tensor([[0.3, 0.05, 0.3]], dtype=D)).requires_grad_(True)
    proxy = torch.tensor([[LOG(0.3 / 0.95), -math.inf, LOG(0.3 / 0.95)]], dtype=D)
    pen, pick = lp_reg_penalty(logp, proxy, torch.tensor([[True, True, False]]))
    assert pick.tolist() == [[True, False, False]]
    assert torch.allclose(pen, torch.tensor([[0.001338, 0.0, 0.0]], dtype=D), atol=1e-6)
    (g,) = torch.autograd.grad(pen.sum(), logp)
    assert g[0, 0] < 0 and g[0, 1] == 0 and torch.isfinite(g).all()  # descent raises pi of token 0


def _lp_hand_inp():
    """One row, probs (.5,.3,.15,.05) at every position; tokens 1, 2, 0 (pi .3, .15, .5); old
    probs .6, .15, .25 -> ratios .5, 1, 2; all advantages -1."""
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]], dtype=D)).expand(1, 3, 4)
    logp = torch.log(torch.tensor([[0.3, 0.15, 0.5]], dtype=D)).requires_grad_(True)
    return PolicyLossInput(logp=logp, old_logp=torch.log(torch.tensor([[0.6, 0.15, 0.25]], dtype=D)),
                           advantages=-torch.ones(1, 3, dtype=D), mask=torch.ones(1, 3, dtype=D), logits=logits)


def test_lp_reg_hand_value_selected_tokens_drop_the_clip():
    # min_p .2 keeps {0,1,2} (mass .95); neg_frac .7 of 3 -> int(2.1) = 2 lowest: tokens .15, .3.
    # Both survive the filter (pi < pi/.95), k3 = 0.0013383 each (see the penalty test).
    # selected, ratio .5:  -r A + k3 = .5 + .0013383 = .5013383   (PPO-clip alone: max(.5, .8) = .8)
    # selected, ratio 1:   1 + .0013383 = 1.0013383
    # not selected, r 2:   max(2, clip(2) = 1.2) = 2
    # token-mean = (.5013383 + 1.0013383 + 2) / 3 = 3.5026766 / 3 = 1.1675589
    k3 = 1 / 0.95 - 1 - LOG(1 / 0.95)
    inp = _lp_hand_inp()
    loss = _reduced("lp_reg", inp, min_p=0.2, neg_frac=0.7)
    assert loss.item() == pytest.approx((0.5 + k3 + 1 + k3 + 2) / 3, abs=1e-12)
    assert loss.item() == pytest.approx(1.1675589, abs=1e-6)
    (g,) = torch.autograd.grad(loss, inp.logp)
    # d/dlogp: -A r + (1 - rho) with rho = 1/.95 on selected, -A r elsewhere, then / 3:
    # (.5 - .0526316) / 3 = .1491228 ; (1 - .0526316) / 3 = .3157895 ; 2 / 3 = .6666667
    expected = torch.tensor([[0.5 + 1 - 1 / 0.95, 1 + 1 - 1 / 0.95, 2.0]], dtype=D) / 3
    torch.testing.assert_close(g, expected)
    # with batch-level candidates (lp_select) only token 1: token 0 is back on the clip (.8, no grad)
    # (.8 + 1.0013383 + 2) / 3 = 3.8013383 / 3 = 1.2671128
    inp = _lp_hand_inp()
    inp.lp_select = torch.tensor([[False, True, False]])
    assert _reduced("lp_reg", inp, min_p=0.2, neg_frac=0.7).item() == pytest.approx(1.2671128, abs=1e-6)


def test_lp_reg_loss_on_policy_value_padding_masking():
    inp = _random()
    inp.old_logp = inp.logp.detach()
    per_token, _ = LOSSES.get("lp_reg")(inp, coef=1.0, neg_frac=1.0, min_p=0.05)
    proxy = minp_proxy_logp(inp.logits, inp.logp, min_p=0.05)
    cand = lp_reg_selection(inp.logp, inp.advantages, inp.mask, neg_frac=1.0)
    pen, pick = lp_reg_penalty(inp.logp, proxy, cand)
    assert pick.any()
    assert torch.allclose(per_token, -inp.advantages + pen, atol=1e-12)  # ratio 1: clip inactive
    assert torch.allclose(_reduced("lp_reg", _pad(inp), neg_frac=1.0, min_p=0.05),
                          _reduced("lp_reg", inp, neg_frac=1.0, min_p=0.05), atol=1e-12)
    inp.lp_select = cand
    assert torch.allclose(_reduced("lp_reg", _pad(inp), neg_frac=1.0, min_p=0.05),
                          _reduced("lp_reg", inp, neg_frac=1.0, min_p=0.05), atol=1e-12)
    with pytest.raises(ValueError, match="unknown Lp-Reg proxy mode"):
        minp_proxy_logp(inp.logits, inp.logp, mode="top_k")


def test_lp_reg_gradcheck_float64(monkeypatch):
    """gradcheck of the registered loss in logp, with its stop-gradient target (the proxy, built
    from the detached logits) held at its value -- finite differences would otherwise move it."""
    inp = _random()
    cand = lp_reg_selection(inp.logp, inp.advantages, inp.mask, neg_frac=1.0)
    proxy = minp_proxy_logp(inp.logits, inp.logp, min_p=0.05)
    monkeypatch.setattr(regularizers, "minp_proxy_logp", lambda *a, **k: proxy)
    assert lp_reg_penalty(inp.logp, proxy, cand)[1].any()

    def f(lp):
        return LOSSES.get("lp_reg")(PolicyLossInput(**dict(inp.__dict__, logp=lp, lp_select=cand)),
                                    neg_frac=1.0, min_p=0.05)[0]

    assert torch.autograd.gradcheck(f, (inp.logp.clone().requires_grad_(True),))


def _learner_batch(pol):
    prompts = [p for p in ["47+85=", "cd 3 5 7>22:", "sort 5 3 1:"] for _ in range(2)]
    ids, mask = encode_prompts(pol.tokenizer, prompts)
    rb = generate(pol.model, ids, mask, params=SamplingParams(8), eos_id=pol.eos_id, pad_id=pol.pad_id,
                  generator=torch.Generator().manual_seed(0))
    n, t = rb.completion_ids.shape
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5, -1.0, 1.0], dtype=torch.float64)[:, None].expand(n, t)
    return LearnerBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=rb.completion_ids,
                        completion_mask=rb.completion_mask, old_logp=rb.logprobs.double(),
                        advantages=adv * rb.completion_mask, rewards=torch.zeros(n),
                        group_index=torch.arange(3).repeat_interleave(2))


def _lp_learner(model, accum):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = functools.partial(LOSSES.get("lp_reg"), min_p=0.5, neg_frac=0.3, pos_frac=0.3)
    return Learner(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), loss_fn=loss_fn,
                   loss_needs=("logits",), reduction="token-mean", max_len=8, temperature=1.0, kl_fn=None,
                   kl_beta=0.0, kl_in_loss=False, epochs=1, minibatches=1, grad_accum=accum, grad_clip=1e9,
                   generator=torch.Generator().manual_seed(0))


def _max_param_diff(a, b):
    return max(float((pa - pb).detach().abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


def test_lp_reg_learner_update_is_micro_batch_invariant(tiny_llama_dir):
    """With the batch-level selection (``lp_select``, as the training loop supplies it) an update
    with grad_accum = 3 equals one with grad_accum = 1. Without it each micro-batch ranks its
    own tokens (the reference code's behaviour) and the two updates differ -- so this test can fail."""
    pol = load_policy(str(tiny_llama_dir), dtype=torch.float64)
    batch = _learner_batch(pol)
    batch.lp_select = lp_reg_selection(batch.old_logp, batch.advantages, batch.completion_mask.double(),
                                       neg_frac=0.3, pos_frac=0.3)
    assert batch.lp_select.sum() >= 4
    models = [copy.deepcopy(pol.model) for _ in range(4)]
    with one_thread():
        out1 = _lp_learner(models[0], 1).update(batch)
        out3 = _lp_learner(models[1], 3).update(batch)
        unranked = dataclasses.replace(batch, lp_select=None)
        _lp_learner(models[2], 1).update(unranked)
        _lp_learner(models[3], 3).update(unranked)
    assert out1["lp_reg/frac"] > 0  # tokens were regularised
    assert out1["loss"] == pytest.approx(out3["loss"], rel=1e-9, abs=1e-12)
    # float64 rounding only: micro-batches run the shared-prompt forward over different row sets
    assert _max_param_diff(models[0], models[1]) < 1e-9
    assert _max_param_diff(models[0], pol.model) > 1e-6  # the update moved the weights
    assert _max_param_diff(models[2], models[3]) > 1e-8


def test_lp_reg_selection_is_wired_once_per_batch():
    """lp_reg declares the input lp_select; its provider runs after the batch filter ("selected"
    stage), with the loss's neg_frac / pos_frac, and picks lp_reg_selection over the kept batch's
    loss_mask and old_logp."""
    plan = resolve(load_config(None, ["loss.name=lp_reg", "loss.kwargs={neg_frac: 0.5, pos_frac: 0.25}"]))
    assert [(cls, s) for cls, _, s in plan.providers if cls is LowProbabilitySelection] == [
        (LowProbabilitySelection, {"neg_frac": 0.5, "pos_frac": 0.25})]
    assert LowProbabilitySelection not in [cls for cls, _, _ in resolve(load_config(None, ["loss.name=grpo"])).providers]
    gen = torch.Generator().manual_seed(4)
    n, t = 4, 5
    old = -torch.rand(n, t, generator=gen, dtype=D) * 3
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=D)[:, None].expand(n, t)
    loss_mask = (torch.rand(n, t, generator=gen) > 0.3).to(D)
    batch = LearnerBatch(prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                         completion_ids=torch.ones(n, t, dtype=torch.long), completion_mask=torch.ones(n, t),
                         old_logp=old, advantages=adv, rewards=torch.zeros(n), group_index=torch.tensor([0, 0, 1, 1]),
                         loss_mask=loss_mask)
    out = LowProbabilitySelection(None, frozenset({"lp_select"}), neg_frac=0.5, pos_frac=0.25).selected(
        StepData(step=1, scored=None, batch=batch))["lp_select"]
    expected = lp_reg_selection(old, adv, loss_mask, neg_frac=0.5, pos_frac=0.25)
    assert torch.equal(out, expected) and expected.any()
    assert not (out & (loss_mask == 0)).any()


# ---------------------------------------------------------------- A7 critical-token KL fixed point
def test_critical_kl_in_reward_reaches_certainty_scaled_fixed_point():
    """REINFORCE with -beta * w(x) * k1 in the reward maximises E[r] - beta w(x) KL per prompt, so
    pi(.|x) = softmax(log pi_ref + r / (beta w(x))): less certain prompts drift further."""
    bandit, beta = make_bandit(n_prompts=3, n_answers=4, seed=11), 0.5
    est = functools.partial(critical, base="k1", certainty="max_prob", exponent=1.0)
    probs = solve(lambda inp: -inp.advantages * inp.logp, bandit, beta=beta, kl=est, steps=250, lr=0.15)
    w = reference_certainty(bandit.ref_logits[:, None, :])[:, 0]  # [X]
    target = torch.softmax(torch.log_softmax(bandit.ref_logits, -1) + bandit.rewards / (beta * w[:, None]), -1)
    assert total_variation(probs, target) < 1e-3
    assert total_variation(probs, tilted_distribution(bandit, beta)) > 1e-2
    # the default base (k3) in the reward does not reach it: k3's value is no score-function KL reward
    est_k3 = functools.partial(critical, certainty="max_prob", exponent=1.0)  # base defaults to k3
    probs_k3 = solve(lambda inp: -inp.advantages * inp.logp, bandit, beta=beta, kl=est_k3, steps=250, lr=0.15)
    assert total_variation(probs_k3, target) > 0.3
