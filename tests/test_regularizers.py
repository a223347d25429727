"""A3-A7 regularisers: Tsallis PG, AKL, AER, Lp-Reg, critical-token KL fixed point."""
import functools
import math

import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.exact import (
    exact_gradient,
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
from tilt.losses import LOSSES
from tilt.losses.regularizers import (
    AERState,
    aer_prompt_coefficients,
    aer_update,
    akl,
    akl_weights,
    group_accuracy,
    lowest_fraction,
    lp_reg_penalty,
    minp_proxy_logp,
)
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


def _reduced(name, inp, **kw):
    per_token, _ = LOSSES.get(name)(inp, **kw)
    mode = LOSSES.entry(name).meta["reduction"]
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=reduction_denominator(inp.mask, mode))


def _pad(inp, pad=2):
    """Append ``pad`` masked columns of garbage to every [N, T] / [N, T, V] field."""
    def cat(x, val):
        if x is None or x.dim() < 2:
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
    # values (3, 1, 2, 5), token 1 ineligible; frac .5 of 3 eligible -> ceil(1.5) = 2: {2 -> 2, 0 -> 3}
    chosen = lowest_fraction(torch.tensor([[3.0, 1.0, 2.0, 5.0]]), torch.tensor([[True, False, True, True]]), 0.5)
    assert chosen.tolist() == [[True, False, True, False]]


def test_lp_reg_penalty_hand_value_and_direction():
    # token 0: pi = .3, proxy .3/.95 -> rho = 1/.95 = 1.052632, k3 = .052632 - log 1.052632 = 0.001338
    # token 1: filtered (proxy -inf) -> 0; token 2: positive advantage, pos_frac 0 -> 0
    logp = torch.log(torch.tensor([[0.3, 0.05, 0.3]], dtype=D)).requires_grad_(True)
    proxy = torch.tensor([[LOG(0.3 / 0.95), -math.inf, LOG(0.3 / 0.95)]], dtype=D)
    adv = torch.tensor([[-1.0, -1.0, 1.0]], dtype=D)
    pen, pick = lp_reg_penalty(logp, proxy, adv, torch.ones(1, 3, dtype=D), neg_frac=1.0)
    assert pick.tolist() == [[True, False, False]]
    assert torch.allclose(pen, torch.tensor([[0.001338, 0.0, 0.0]], dtype=D), atol=1e-6)
    (g,) = torch.autograd.grad(pen.sum(), logp)
    assert g[0, 0] < 0 and g[0, 1] == 0 and torch.isfinite(g).all()  # descent raises pi of token 0


def test_lp_reg_loss_on_policy_value_padding_masking():
    inp = _random()
    inp.old_logp = inp.logp.detach()
    per_token, _ = LOSSES.get("lp_reg")(inp, coef=1.0, neg_frac=1.0, min_p=0.05)
    proxy = minp_proxy_logp(inp.logits, inp.logp, min_p=0.05)
    pen, _ = lp_reg_penalty(inp.logp, proxy, inp.advantages, inp.mask, neg_frac=1.0)
    assert torch.allclose(per_token, -inp.advantages + pen, atol=1e-12)
    assert torch.allclose(_reduced("lp_reg", _pad(inp), neg_frac=1.0, min_p=0.05),
                          _reduced("lp_reg", inp, neg_frac=1.0, min_p=0.05), atol=1e-12)
    with pytest.raises(ValueError, match="unknown Lp-Reg proxy mode"):
        minp_proxy_logp(inp.logits, inp.logp, mode="top_k")


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
