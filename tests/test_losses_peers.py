"""B11 peer losses (TRL's loss types bnpo, cispo, sapo, luspo, vespo) and the k3_is KL estimator:
hand-computed values and gradients, and fixed points on the exact harness. Equality with TRL's
own code is tests/test_trl_parity.py."""
import math

import pytest
import torch

from loss_helpers import with_exact_reverse_kl
from tilt.batch import PolicyLossInput
from tilt.exact import make_bandit, make_tree, optimal_policy, sequence_probs, solve, tilted_distribution, total_variation
from tilt.kl import k3, k3_is
from tilt.losses import LOSSES
from tilt.reduction import reduce_tokens, reduction_denominator

D = torch.float64
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [1.25, 0.7, 9.0]], dtype=D)  # last token of row 1 is padding
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 100.0]], dtype=D)
# pi_old = 0.5 everywhere, so logp = log(0.5 r): row 0 log .75, log .25, log .55; row 1 log .625, log .35


def _inp() -> PolicyLossInput:
    old = torch.full_like(RATIOS, math.log(0.5))
    return PolicyLossInput(logp=(old + RATIOS.log()).requires_grad_(True), old_logp=old, advantages=ADV, mask=MASK)


def _loss(name, inp, **hypers):
    entry = LOSSES.entry(name)
    per_token, metrics = entry.fn(inp, **hypers)
    mode = entry.meta["reduction"]
    value = reduce_tokens(per_token, inp.mask, mode=mode, denominator=reduction_denominator(inp.mask, mode))
    return value, metrics


def test_bnpo_is_clipped_surrogate_token_mean():
    # -min(r A, clip(r, .8, 1.2) A): row 0 -1.2 -0.5 -1.1 = -2.8 ; row 1 2.5 + 1.6 = 4.1 ; (4.1 - 2.8) / 5 = 0.26
    value, m = _loss("bnpo", _inp())
    assert value.item() == pytest.approx(0.26, abs=1e-12)
    assert m["clip/frac"].item() == pytest.approx(2 / 5)  # r = 1.5 with A > 0 and r = 0.7 with A < 0 bind


def test_cispo_value_and_gradient():
    # w = sg[min(r, 1.2)]: row 0 1.2, 0.5, 1.1 ; row 1 1.2, 0.7.  loss = -w A logp, token-mean over 5:
    #   row 0: -1.2 log .75 = 0.345218, -0.5 log .25 = 0.693147, -1.1 log .55 = 0.657621
    #   row 1: 2.4 log .625 = -1.128009, 1.4 log .35 = -1.469751      sum -0.901774 / 5 = -0.180355
    inp = _inp()
    value, m = _loss("cispo", inp, eps_max=1.2)
    assert value.item() == pytest.approx(-0.1803548, abs=1e-6)
    (g,) = torch.autograd.grad(value, inp.logp)
    # d/dlogp = -w A / 5 (weights detached): row 0 -.24 -.10 -.22 ; row 1 .48 .28 ; padding 0
    expected = torch.tensor([[-0.24, -0.10, -0.22], [0.48, 0.28, 0.0]], dtype=D)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-12)
    assert m["clip/frac"].item() == pytest.approx(1 / 5)  # r = 1.5 with A > 0 (r = 1.25 has A < 0)


def test_sapo_soft_gate_value_and_on_policy_gradient():
    # -sigmoid(tau (r-1)) 4/tau A, tau = 1 (A > 0) or 1.05 (A < 0); seq-mean-token-mean:
    #   row 0: -4 (s(.5) + s(-.5) + s(.1)) / 3 = -4 (.622459 + .377541 + .524979) / 3 = -2.033306
    #   row 1: 2 * 4/1.05 (s(.2625) + s(-.315)) / 2 = 7.619048 (.565251 + .421895) / 2 = 3.760557
    #   mean 0.863625
    value, _ = _loss("sapo", _inp())
    assert value.item() == pytest.approx(0.863625, abs=1e-5)
    ones = torch.ones_like(RATIOS)
    on = PolicyLossInput(logp=torch.zeros_like(RATIOS).requires_grad_(True), old_logp=torch.zeros_like(RATIOS),
                         advantages=ADV, mask=MASK)
    v, _ = _loss("sapo", on)
    (g,) = torch.autograd.grad(v, on.logp)
    # at r = 1: d/dr [4/tau sigmoid(tau (r-1))] = 4 sigmoid'(0) = 1, so d loss / d logp = -A / (N len_i)
    expected = -ADV * MASK / (2 * MASK.sum(-1, keepdim=True)) * ones
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-12)


def test_luspo_sequence_ratio_times_length():
    # s_i = exp(mean_t log r): row 0 exp(log(.825)/3) = .937889 ; row 1 exp(log(.875)/2) = .935414 (no clip)
    # per-token -s A summed over tokens (= length x sequence loss), mean over sequences:
    #   (-3 x .937889 + 2 x 2 x .935414) / 2 = (-2.813667 + 3.741657) / 2 = 0.463995
    value, _ = _loss("luspo", _inp())
    assert value.item() == pytest.approx(0.463995, abs=1e-6)


def test_vespo_gamma_weight_value_and_gradient():
    # sequence log w = sum_t log r: row 0 log .825 = -.192372 ; row 1 log .875 = -.133531
    # phi = exp(lam + k log w - lam w): row 0 (A >= 0: k 2, lam 3) exp(3 - .384744 - 2.475) = 1.150571
    #                                   row 1 (A < 0:  k 3, lam 2) exp(2 - .400594 - 1.75) = 0.860198
    # loss -phi A logp, token-mean over 5: row 0 1.150571 x 2.271813 = 2.613883 ;
    #   row 1 -2 x .860198 x 1.519826 = -2.614700 ; (2.613883 - 2.614700) / 5 = -0.0001634
    inp = _inp()
    value, _ = _loss("vespo", inp)
    assert value.item() == pytest.approx(-0.0001634, abs=2e-6)
    (g,) = torch.autograd.grad(value, inp.logp)
    # -phi A / 5: row 0 -.230114 ; row 1 +.344079
    expected = torch.tensor([[-0.230114] * 3, [0.344079, 0.344079, 0.0]], dtype=D)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-6)


def test_k3_is_value_and_reverse_kl_gradient():
    # pi = .5, pi_ref = .25, pi_old = .25: ratio 2, k3 = .5 - 1 - log .5 = .193147, k3_is = .386294
    logp = torch.tensor([[math.log(0.5)]], dtype=D, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=D)
    assert k3_is(logp, ref, old_logp=ref).item() == pytest.approx(2 * (0.5 - 1 - math.log(0.5)), abs=1e-12)
    # on-policy (old = sg[logp]): value k3, gradient k3 + (1 - rho) = log pi - log pi_ref = log 2 (reverse KL)
    v = k3_is(logp, ref)
    (g,) = torch.autograd.grad(v.sum(), logp)
    assert v.item() == pytest.approx(k3(logp, ref).item(), abs=1e-15)
    assert g.item() == pytest.approx(math.log(2.0), abs=1e-12)
    # sequence level: one weight exp(mean_t log r) for all tokens: mean(log 2, 0) -> sqrt 2
    lp = torch.log(torch.tensor([[0.5, 0.5]], dtype=D))
    out = k3_is(lp, torch.log(torch.tensor([[0.25, 0.5]], dtype=D)), old_logp=torch.log(torch.tensor([[0.25, 0.5]], dtype=D)),
                mask=torch.ones(1, 2, dtype=D), level="sequence")
    torch.testing.assert_close(out, math.sqrt(2) * torch.tensor([[0.5 - 1 - math.log(0.5), 0.0]], dtype=D))


# ------------------------------------------------------------------ fixed points (exact harness)

BETA = 0.5
PEERS = ["bnpo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("name", PEERS)
def test_peer_losses_reach_tilted_optimum_with_reverse_kl(name):
    """On-policy every weight is 1 and every gate has slope 1 (CISPO w = 1, SAPO f'(1) = 1, VESPO
    phi(1) = 1, LUSPO's sequence ratio sums grad log pi over the tokens), so each surrogate's
    gradient is E[A grad log pi]; with the exact reverse KL (bandit: in the loss; tree: k1 in the
    reward, token-level ratio) it reaches pi* = pi_ref exp(r/beta) / Z."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    mode = LOSSES.entry(name).meta["reduction"]
    p = solve(with_exact_reverse_kl(name, BETA), bandit, beta=BETA, mode=mode, steps=60, lr=0.3)
    assert total_variation(p, optimal_policy(bandit, BETA)) < 0.02
    tree = make_tree(depth=2, vocab=3, seed=0)
    kw = {"level": "token"} if name == "luspo" else {}  # reward-to-go differs per token on a tree
    p = solve(name, tree, beta=BETA, kl="k1", steps=60, lr=0.3, **kw)
    assert total_variation(sequence_probs(tree, p), tilted_distribution(tree, BETA)) < 0.02


def test_grpo_with_k3_is_in_loss_reaches_tilted_optimum():
    """TRL's default KL term (use_bias_correction_kl: ratio-weighted k3) has the reverse-KL
    gradient, so grpo + beta k3_is reaches pi*; plain k3 in the loss goes to the forward-KL
    optimum instead (tests/test_losses_policy.py), > 0.05 TV away on this bandit."""
    beta = 0.2
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    bandit = type(bandit)(rewards=3.0 * bandit.rewards, ref_logits=bandit.ref_logits)

    def grpo_k3_is(inp):
        per_token, _ = LOSSES.get("grpo")(inp)
        return per_token + beta * k3_is(inp.logp, inp.ref_logp, old_logp=inp.old_logp, mask=inp.mask)

    def grpo_k3(inp):
        per_token, _ = LOSSES.get("grpo")(inp)
        return per_token + beta * k3(inp.logp, inp.ref_logp)

    target = optimal_policy(bandit, beta)
    p = solve(grpo_k3_is, bandit, beta=beta, mode="seq-mean-token-mean", steps=300, lr=0.3)
    assert total_variation(p, target) < 0.02
    p_k3 = solve(grpo_k3, bandit, beta=beta, mode="seq-mean-token-mean", steps=300, lr=0.3)
    assert total_variation(p_k3, target) > 0.05


# ------------------------------------------------------------------ GRPO's std normalisation and beta

def std_normalised(returns, weights, enum):
    """GRPO's advantage in the infinite-group limit: (r - E_pi[r|x]) / std_pi(r|x)."""
    from tilt.exact import group_mean

    centred = returns[:, 0] - group_mean(returns[:, 0], weights, enum)  # [N]
    std = group_mean(centred**2, weights, enum).sqrt()  # [N]
    return (centred / std)[:, None].expand_as(returns)


def test_grpo_std_normalisation_scales_the_effective_kl_coefficient():
    """With A = (r - mean)/sigma_x(pi), the on-policy gradient is that of E[r]/sigma_x - beta KL per prompt,
    i.e. of E[r] - beta sigma_x(pi) KL: the effective coefficient is beta * sigma_x at the fixed point.
    So grpo + beta k3_is (reverse KL) reaches softmax(log pi_ref + r / (beta sigma_x)), not pi*; the
    default job (grpo advantage + grpo loss + k3 in the loss, forward KL) reaches the forward-KL optimum
    at beta sigma_x, neither pi* nor the forward-KL optimum at beta."""
    from tilt.exact import forward_kl_optimum
    from tilt.exact.targets import forward_kl_tilt

    beta = 0.3
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    logp_ref = torch.log_softmax(bandit.ref_logits, -1)

    def sigma(p):  # std of r under p per prompt, [X, 1]
        m = (p * bandit.rewards).sum(-1, keepdim=True)
        return (p * (bandit.rewards - m) ** 2).sum(-1, keepdim=True).sqrt()

    for est, reverse in ((k3_is, True), (k3, False)):
        def loss(inp, est=est):
            per_token, _ = LOSSES.get("grpo")(inp)
            kw = {"old_logp": inp.old_logp, "mask": inp.mask} if est is k3_is else {}
            return per_token + beta * est(inp.logp, inp.ref_logp, **kw)

        p = solve(loss, bandit, beta=beta, mode="seq-mean-token-mean", advantage=std_normalised, steps=400, lr=0.2)
        s = sigma(p)  # [X, 1] self-consistent sigma at the fixed point
        if reverse:
            scaled = torch.softmax(logp_ref + bandit.rewards / (beta * s), -1)
            plain = optimal_policy(bandit, beta)
        else:
            scaled = forward_kl_tilt(logp_ref, bandit.rewards / s, beta)
            plain = forward_kl_optimum(bandit, beta)
        assert total_variation(p, scaled) < 0.02
        assert total_variation(p, plain) > 0.1
        assert (s < 0.5).all()  # sigma_x < 1: the effective beta is smaller, the policy greedier
