"""RPG grid (arXiv:2505.17508): hand values, invariances, exact gradients, fixed points."""
import math

import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.exact import (
    exact_gradient,
    forward_kl_optimum,
    make_bandit,
    make_tree,
    per_state_fixed_point,
    sequence_probs,
    solve,
    state_visit_probs,
    tilted_distribution,
    total_variation,
)
from tilt.kl import k3
from tilt.losses import LOSSES
from tilt.reduction import reduce_tokens, reduction_denominator

D = torch.float64
KINDS = ("fkl", "ufkl", "rkl", "urkl")
NAMES = [f"rpg_{k}" for k in KINDS] + [f"rpg_rf_{k}" for k in KINDS]


def _one_token(logp=0.5, old=0.25, ref=0.4, adv=2.0):
    lp = torch.tensor([[math.log(logp)]], dtype=D, requires_grad=True)
    return PolicyLossInput(
        logp=lp, old_logp=torch.tensor([[math.log(old)]], dtype=D),
        advantages=torch.tensor([[adv]], dtype=D), mask=torch.ones(1, 1, dtype=D),
        ref_logp=torch.tensor([[math.log(ref)]], dtype=D),
    )


# pi = 0.5, pi_old = 0.25, pi_ref = 0.4, A = 2, beta = 0.1:
# w = 0.5/0.25 = 2, rho = 0.4/0.25 = 1.6, log u = log(0.5/0.4) = 0.223144
# f_fkl  = -1.6*0.223144            = -0.357030 -> loss = -2*2 + 0.1*(-0.357030) = -4.035703
# f_ufkl = 2 - 0.357030 - 1.6       =  0.042970 -> loss = -4 + 0.004297          = -3.995703
# f_rkl  = 2*0.223144               =  0.446287 -> loss = -4 + 0.044629          = -3.955371
# f_urkl = 2*(0.223144 - 1) + 1.6   =  0.046287 -> loss = -4 + 0.004629          = -3.995371
# REINFORCE: loss = -(w A - beta g) log pi, log pi = log 0.5 = -0.693147
# g_fkl = -1.6 -> coef 4 + 0.16 = 4.16 -> 4.16*0.693147 = 2.883492
# g_ufkl = 2 - 1.6 = 0.4 -> coef 3.96 -> 2.744863
# g_rkl = 2*(1.223144) = 2.446287 -> coef 3.755371 -> 2.603025
# g_urkl = 2*0.223144 = 0.446287 -> coef 3.955371 -> 2.741654
HAND = {
    "rpg_fkl": -4.035703, "rpg_ufkl": -3.995703, "rpg_rkl": -3.955371, "rpg_urkl": -3.995371,
    "rpg_rf_fkl": 2.883492, "rpg_rf_ufkl": 2.744863, "rpg_rf_rkl": 2.603025, "rpg_rf_urkl": 2.741654,
}


@pytest.mark.parametrize("name", NAMES)
def test_hand_values(name):
    per_token, metrics = LOSSES.get(name)(_one_token(), beta=0.1)
    assert per_token.shape == (1, 1)
    assert per_token.item() == pytest.approx(HAND[name], abs=1e-6)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_of_the_two_forms_agree(kind):
    """d/dlogp of -wA + beta f equals -(wA - beta g) for every sample (App. J), e.g. for rkl at
    the hand point: -4 + 0.1*2*(0.223144 + 1) = -3.755371 = -coef_rkl."""
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4)
    logp = (-torch.rand(shape, generator=gen, dtype=D) * 2).requires_grad_(True)
    base = dict(old_logp=-torch.rand(shape, generator=gen, dtype=D) * 2,
                advantages=torch.randn(shape, generator=gen, dtype=D), mask=torch.ones(shape, dtype=D),
                ref_logp=-torch.rand(shape, generator=gen, dtype=D) * 2)
    grads = []
    for name in (f"rpg_{kind}", f"rpg_rf_{kind}"):
        loss, _ = LOSSES.get(name)(PolicyLossInput(logp=logp, **base), beta=0.3)
        (g,) = torch.autograd.grad(loss.sum(), logp)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_rkl_hand_gradient():
    inp = _one_token()
    loss, _ = LOSSES.get("rpg_rkl")(inp, beta=0.1)
    (g,) = torch.autograd.grad(loss.sum(), inp.logp)
    assert g.item() == pytest.approx(-3.755371, abs=1e-6)


def test_sequence_level_hand_value():
    # one sequence, two tokens: log w = (log .5 - log .25) + (log .8 - log .8) = log 2,
    # log u = (log .5 - log .4) + (log .8 - log .5) = log(0.4/0.2) = log 2, rho = w/u = 1,
    # A = mean(2, 2) = 2; rkl: L = -2*2 + 0.1 * 2 log 2 = -4 + 0.138629 = -3.861371,
    # spread as L/2 on each token
    logp = torch.log(torch.tensor([[0.5, 0.8]], dtype=D))
    inp = PolicyLossInput(logp=logp, old_logp=torch.log(torch.tensor([[0.25, 0.8]], dtype=D)),
                          advantages=torch.full((1, 2), 2.0, dtype=D), mask=torch.ones(1, 2, dtype=D),
                          ref_logp=torch.log(torch.tensor([[0.4, 0.5]], dtype=D)))
    per_token, _ = LOSSES.get("rpg_rkl")(inp, beta=0.1, level="sequence")
    assert torch.allclose(per_token, torch.full((1, 2), -3.861371 / 2, dtype=D), atol=1e-6)


def _random_input(n=3, t=5, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=D)
    mask[0, 3:] = 0
    mask[n - 1, 1:] = 0
    return PolicyLossInput(
        logp=(-torch.rand(n, t, generator=gen, dtype=D) * 2).requires_grad_(requires_grad),
        old_logp=-torch.rand(n, t, generator=gen, dtype=D) * 2,
        advantages=torch.randn(n, 1, generator=gen, dtype=D).expand(n, t).clone(),
        mask=mask, ref_logp=-torch.rand(n, t, generator=gen, dtype=D) * 2,
    )


def _reduce(name, inp, **kw):
    per_token, _ = LOSSES.get(name)(inp, **kw)
    mode = LOSSES.entry(name).meta["reduction"]
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=reduction_denominator(inp.mask, mode))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_padding_changes_nothing(name, level):
    inp = _random_input()
    value = _reduce(name, inp, beta=0.2, level=level)
    pad = 2  # extra padded columns with garbage values
    big = PolicyLossInput(
        logp=torch.cat([inp.logp, torch.full((3, pad), 7.0, dtype=D)], 1),
        old_logp=torch.cat([inp.old_logp, torch.full((3, pad), -9.0, dtype=D)], 1),
        advantages=torch.cat([inp.advantages, torch.full((3, pad), 5.0, dtype=D)], 1),
        mask=torch.cat([inp.mask, torch.zeros(3, pad, dtype=D)], 1),
        ref_logp=torch.cat([inp.ref_logp, torch.full((3, pad), 3.0, dtype=D)], 1),
    )
    assert torch.allclose(_reduce(name, big, beta=0.2, level=level), value, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_equals_selected_only(name, level):
    """Sequence 0 with tokens 3-4 masked gives the same loss as sequence 0 cut to 3 tokens."""
    inp = _random_input()
    per_token, _ = LOSSES.get(name)(inp, beta=0.2, level=level)
    masked_sum = (per_token * inp.mask)[0].sum()
    cut = PolicyLossInput(logp=inp.logp[:1, :3], old_logp=inp.old_logp[:1, :3],
                          advantages=inp.advantages[:1, :3], mask=inp.mask[:1, :3], ref_logp=inp.ref_logp[:1, :3])
    selected, _ = LOSSES.get(name)(cut, beta=0.2, level=level)
    assert torch.allclose(masked_sum, selected.sum(), atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_finite(name):
    """gradcheck applies to the fully differentiable forms; the REINFORCE-style forms hold a
    stop-gradient coefficient by design, so for them only finiteness (and the hand gradients
    of test_per_sample_gradients_of_the_two_forms_agree) is checked."""
    for level in ("token", "sequence"):
        inp = _random_input(n=2, t=3, seed=4)

        def f(logp):
            fields = dict(inp.__dict__, logp=logp)
            return LOSSES.get(name)(PolicyLossInput(**fields), beta=0.3, level=level)[0]

        if "_rf_" not in name:
            assert torch.autograd.gradcheck(f, (inp.logp,))
        (g,) = torch.autograd.grad(f(inp.logp).sum(), inp.logp)
        assert torch.isfinite(g).all()


def test_unknown_level_and_missing_ref_raise():
    inp = _random_input()
    with pytest.raises(ValueError, match="unknown RPG level"):
        LOSSES.get("rpg_rkl")(inp, beta=0.1, level="batch")
    inp.ref_logp = None
    with pytest.raises(ValueError, match="need ref_logp"):
        LOSSES.get("rpg_rf_rkl")(inp, beta=0.1)


def test_rpg_style_clip_masks_hand_cases():
    # w = pi/pi_old per token: 2.0 (A>0: >= 1.28, dropped), 0.5 (A<0: < 0.8, dropped),
    # 3.5 (A<0: >= c = 3, dropped), 1.1 (A<0: kept), 0.5 (A>0: kept)
    w = torch.tensor([[2.0, 0.5, 3.5, 1.1, 0.5]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0, 1.0]], dtype=D)
    old = torch.full((1, 5), math.log(0.2), dtype=D)
    inp = PolicyLossInput(logp=(old + w.log()).requires_grad_(True), old_logp=old, advantages=adv,
                          mask=torch.ones(1, 5, dtype=D), ref_logp=old.clone())
    loss, metrics = LOSSES.get("rpg_rf_rkl")(inp, beta=0.0, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    (g,) = torch.autograd.grad(loss.sum(), inp.logp)
    # kept tokens: grad = -w A: token 3 -> -1.1*(-1) = 1.1, token 4 -> -0.5*1 = -0.5
    assert torch.allclose(g, torch.tensor([[0.0, 0.0, 0.0, 1.1, -0.5]], dtype=D))
    assert metrics["clip/frac"].item() == pytest.approx(0.6)


def _sequence_objective(problem, table, beta, kind):
    """J = sum_x p(x) [E_pi[r] - beta D(pi(.|x), pi_ref(.|x))] over sequences, exactly."""
    seq = sequence_probs(problem, torch.softmax(table, -1))  # [X, Y]
    ref = sequence_probs(problem, torch.softmax(problem.ref_logits, -1))  # [X, Y]
    e = problem.enumerate()
    px = e.prompt_prob.reshape(seq.shape)[:, 0]  # [X]
    r = e.rewards.reshape(seq.shape)
    return (px * ((seq * r).sum(-1) - beta * _divergence(seq, ref, kind))).sum()


def _divergence(p, p_ref, kind):
    """The four divergences of the RPG grid, literally (unnormalised terms kept), over dim -1."""
    if kind == "fkl":
        return (p_ref * (p_ref.log() - p.log())).sum(-1)
    if kind == "ufkl":
        return (p_ref * (p_ref.log() - p.log()) + p - p_ref).sum(-1)
    if kind == "rkl":
        return (p * (p.log() - p_ref.log())).sum(-1)
    return (p * (p.log() - p_ref.log()) - p + p_ref).sum(-1)


PROBLEMS = {"bandit": make_bandit(n_prompts=2, n_answers=4, seed=5), "tree": make_tree(depth=2, vocab=3, seed=6)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("problem_name", ["bandit", "tree"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_sequence_level_expected_gradient_is_objective_gradient(name, problem_name, off_policy):
    """Exact E_old[grad loss] = -grad J, on-policy and off-policy (importance weights)."""
    problem, beta, kind = PROBLEMS[problem_name], 0.3, name.split("_")[-1]
    gen = torch.Generator().manual_seed(2)
    logits = problem.ref_logits + torch.randn(problem.ref_logits.shape, generator=gen, dtype=D)
    old = logits + 0.5 * torch.randn(logits.shape, generator=gen, dtype=D) if off_policy else None
    grad = exact_gradient(name, logits, problem, old_logits=old, loss_kwargs=dict(beta=beta, level="sequence"))
    table = logits.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(-_sequence_objective(problem, table, beta, kind), table)
    assert torch.allclose(grad, expected, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_token_level_expected_gradient_is_per_state_objective_gradient(name):
    """Token level, on-policy, tree: -grad of J_tok = E_pi[r] - beta sum_s d(s) D_s, with the state
    visit probabilities d(s) held at pi_old (the per-token KL objective)."""
    problem, beta, kind = PROBLEMS["tree"], 0.3, name.split("_")[-1]
    gen = torch.Generator().manual_seed(3)
    logits = problem.ref_logits + torch.randn(problem.ref_logits.shape, generator=gen, dtype=D)
    grad = exact_gradient(name, logits, problem, loss_kwargs=dict(beta=beta, level="token"))
    visits = state_visit_probs(problem, torch.softmax(logits, -1))  # [S] at pi_old
    table = logits.clone().requires_grad_(True)
    seq = sequence_probs(problem, torch.softmax(table, -1))  # [1, Y]
    reward = (seq * problem.enumerate().rewards.reshape(seq.shape)).sum()
    per_state = _divergence(torch.softmax(table, -1), torch.softmax(problem.ref_logits, -1), kind)  # [S]
    (expected,) = torch.autograd.grad(-(reward - beta * (visits * per_state).sum()), table)
    assert torch.allclose(grad, expected, atol=1e-10)


def test_importance_weighted_k3_is_the_urkl_term():
    """w * k3 (GRPO's k3 corrected by the importance weight) equals f_urkl sample by sample:
    w (rho/w - 1 + log u) = rho - w + w log u = w (log u - 1) + rho."""
    inp = _random_input(requires_grad=False)
    w = torch.exp(inp.logp - inp.old_logp)
    per_token, _ = LOSSES.get("rpg_urkl")(inp, beta=1.0)
    kl_part = per_token + w * inp.advantages  # remove -w A
    assert torch.allclose(kl_part * inp.mask, w * k3(inp.logp, inp.ref_logp) * inp.mask, atol=1e-12)


BETA = 0.5


@pytest.mark.parametrize("name", ["rpg_rkl", "rpg_urkl", "rpg_rf_rkl", "rpg_rf_urkl"])
@pytest.mark.parametrize("problem_name", ["bandit", "tree"])
def test_reverse_kl_rpg_reaches_tilted_optimum(name, problem_name):
    """Sequence-level rkl/urkl maximise E[r] - beta KL(pi || pi_ref) (UKL = KL for a normalised
    policy), so the fixed point is pi_ref exp(r/beta)/Z."""
    problem = PROBLEMS[problem_name]
    probs = solve(name, problem, beta=BETA, steps=200, lr=0.15, level="sequence")
    tv = total_variation(sequence_probs(problem, probs), tilted_distribution(problem, BETA))
    assert tv < 1e-3  # well inside the catalogue tolerance 0.02


@pytest.mark.parametrize("name", ["rpg_fkl", "rpg_ufkl", "rpg_rf_fkl", "rpg_rf_ufkl"])
@pytest.mark.parametrize("problem_name", ["bandit", "tree"])
def test_forward_kl_rpg_reaches_forward_kl_fixed_point(name, problem_name):
    """Sequence-level fkl/ufkl maximise E[r] - beta KL(pi_ref || pi); the fixed point is
    pi(y) = beta pi_ref(y) / (lambda - r(y)) (closed form up to the 1-D root lambda), which
    differs from the tilted optimum."""
    problem = PROBLEMS[problem_name]
    probs = sequence_probs(problem, solve(name, problem, beta=BETA, steps=200, lr=0.15, level="sequence"))
    assert total_variation(probs, forward_kl_optimum(problem, BETA)) < 1e-3  # tolerance 0.02
    assert total_variation(probs, tilted_distribution(problem, BETA)) > 1e-2  # a different point


@pytest.mark.parametrize("name,divergence", [("rpg_rkl", "reverse"), ("rpg_rf_urkl", "reverse"),
                                             ("rpg_fkl", "forward"), ("rpg_rf_ufkl", "forward")])
def test_token_level_rpg_reaches_per_state_fixed_point(name, divergence):
    """Token-level RPG (per-token ratios, the paper's code) penalises the per-state divergence at
    states drawn from pi_old, so on the tree it converges to pi(.|s) = tilt of pi_ref(.|s) by the
    reward-only continuation value Q_r (per_state_fixed_point), which is not the sequence optimum."""
    problem = PROBLEMS["tree"]
    probs = solve(name, problem, beta=BETA, steps=300, lr=0.15)
    target = per_state_fixed_point(problem, BETA, divergence=divergence)
    assert total_variation(sequence_probs(problem, probs), sequence_probs(problem, target)) < 1e-4
    reverse = divergence == "reverse"
    sequence_target = tilted_distribution(problem, BETA) if reverse else forward_kl_optimum(problem, BETA)
    assert total_variation(sequence_probs(problem, target), sequence_target) > 1e-3
