"""B2 TOPR, B3 PSR/NSR/W-REINFORCE, B7 LENS: hand-computed values and fixed points."""
import math

import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.exact import Bandit, exact_expectation, exact_gradient, solve, total_variation
from tilt.losses import LOSSES
from tilt.losses.asymmetric import lens_rewards
from loss_helpers import reduced_loss as _loss

D = torch.float64
L = math.log




def _topr_inp():
    # row 0 positive (A = +1): pi = (.5, .25), mu arbitrary (.9, .1) -- ignored for positives
    # row 1 negative (A = -1): pi = (.25, .4), mu = (.5, .5): ratios .5, .8, sequence ratio .4
    logp = torch.tensor([[L(0.5), L(0.25)], [L(0.25), L(0.4)]], dtype=D).requires_grad_(True)
    old = torch.tensor([[L(0.9), L(0.1)], [L(0.5), L(0.5)]], dtype=D)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=D)
    return PolicyLossInput(logp=logp, old_logp=old, advantages=adv, mask=torch.ones(2, 2, dtype=D))


def test_topr_sequence_level_value_and_gradient():
    # loss = -w A sum_t log pi, mean over sequences:
    #   row0: w = 1 -> -(ln .5 + ln .25) = -(-0.693147 - 1.386294) = 2.079442
    #   row1: w = min(.5 * .8, 1) = .4 -> .4 (ln .25 + ln .4) = .4 (-2.302585) = -0.921034
    #   mean = (2.079442 - 0.921034) / 2 = 0.579204
    inp = _topr_inp()
    loss, metrics = _loss("topr", inp)
    assert loss.item() == pytest.approx((-(L(0.5) + L(0.25)) + 0.4 * (L(0.25) + L(0.4))) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.579204, abs=1e-6)
    assert metrics["topr/neg_weight"].item() == pytest.approx(0.4)
    assert metrics["clip/frac"].item() == 0.0  # ratio .4 < 1: no truncation
    (grad,) = torch.autograd.grad(loss, inp.logp)
    # d/dlogp = -w A / N: row0 -1/2, row1 +.4/2 = .2 (the weight is a stop-gradient)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5], [0.2, 0.2]], dtype=D))


def test_topr_token_level_and_truncation():
    # token level: row1 weights .5 and .8 -> .5 ln .25 + .8 ln .4 = -0.693147 - 0.733033 = -1.426180
    #   mean = (2.079442 - 1.426180) / 2 = 0.326631
    loss, _ = _loss("topr", _topr_inp(), level="token")
    assert loss.item() == pytest.approx((-(L(0.5) + L(0.25)) + 0.5 * L(0.25) + 0.8 * L(0.4)) / 2, abs=1e-12)
    # if pi > mu on the negative (ratio 2 * 1.25 = 2.5) the weight is truncated to 1: plain REINFORCE
    inp = _topr_inp()
    inp.old_logp = torch.tensor([[L(0.9), L(0.1)], [L(0.125), L(0.32)]], dtype=D)
    loss, metrics = _loss("topr", inp)
    assert loss.item() == pytest.approx((-(L(0.5) + L(0.25)) + (L(0.25) + L(0.4))) / 2, abs=1e-12)
    assert metrics["clip/frac"].item() == 1.0  # both tokens of the only negative are truncated


def _signed_inp():
    # three one-token samples: rewards 1, 0, 1 ; ratios 1.0, 0.5, 1.5
    old = torch.full((3, 1), L(0.4), dtype=D)
    logp = (old + torch.tensor([[0.0], [L(0.5)], [L(1.5)]], dtype=D)).requires_grad_(True)
    return PolicyLossInput(logp=logp, old_logp=old, advantages=torch.zeros(3, 1, dtype=D),
                           mask=torch.ones(3, 1, dtype=D), rewards=torch.tensor([1.0, 0.0, 1.0], dtype=D))


def test_psr_nsr_w_reinforce_values():
    # PPO-clip surrogate -min(r A, clip(r, .8, 1.2) A), token-mean over 3 tokens
    # psr  A = (1, 0, 1):   -1 ; 0 ; -min(1.5, 1.2) = -1.2            -> -2.2 / 3 = -0.733333
    # nsr  A = (0, -1, 0):   0 ; -min(-.5, -.8) = .8 ; 0              ->  0.8 / 3 =  0.266667
    # w    A = (.1, -1, .1): -.1 ; .8 ; -min(.15, .12) = -.12         -> 0.58 / 3 =  0.193333
    assert _loss("psr", _signed_inp())[0].item() == pytest.approx(-2.2 / 3, abs=1e-12)
    loss, metrics = _loss("nsr", _signed_inp())
    assert loss.item() == pytest.approx(0.8 / 3, abs=1e-12)
    assert metrics["clip/frac"].item() == pytest.approx(1 / 3)  # the wrong sample, r < .8 and A < 0
    assert _loss("w_reinforce", _signed_inp())[0].item() == pytest.approx(0.58 / 3, abs=1e-12)
    # rewards in {-1, +1} are classified the same way (threshold .5)
    inp = _signed_inp()
    inp.rewards = torch.tensor([1.0, -1.0, 1.0], dtype=D)
    assert _loss("nsr", inp)[0].item() == pytest.approx(0.8 / 3, abs=1e-12)


def test_w_reinforce_on_policy_gradient_is_weighted_reinforce():
    # ratio 1: d/dlogp = -A / N with A = +lam on correct, -1 on wrong: (-.1/3, 1/3, -.1/3)
    inp = _signed_inp()
    inp.logp = inp.old_logp.clone().requires_grad_(True)
    loss, _ = _loss("w_reinforce", inp)
    (grad,) = torch.autograd.grad(loss, inp.logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.1 / 3], [1 / 3], [-0.1 / 3]], dtype=D))


def test_lens_rewards_penalise_confident_mistakes():
    # one mixed group of G = 3, rewards (1, 0, 0), confidences (.9, .5, .75) (arXiv:2510.08696 Sec. 5.1):
    # D_imp = [(1/3)(1/.9)]^-1 = 2.7 ; 2 max c = 1.8 ; D = 2.7
    # r~ = (1, -(1/3) .5/(2.7-.5), -(1/3) .75/(2.7-.75)) = (1, -.0757576, -.1282051)
    out = lens_rewards(torch.tensor([1.0, 0.0, 0.0], dtype=D), torch.tensor([0.9, 0.5, 0.75], dtype=D),
                       torch.tensor([0, 0, 0]))
    torch.testing.assert_close(out, torch.tensor([1.0, -0.5 / 6.6, -0.75 / 5.85], dtype=D))
    # a negative group: D = 2 max c = 1.5 -> r~ = -(1/3) c/(1.5 - c) = (-.5, -.1111111, -.3333333)
    out = lens_rewards(torch.zeros(3, dtype=D), torch.tensor([0.5, 0.25, 0.75], dtype=D), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(out, torch.tensor([-0.5 / 3, -0.25 / 3.75, -0.75 / 2.25], dtype=D))


def test_lens_gives_gradient_in_all_wrong_groups():
    # one-token samples, on-policy (ratio 1); groups {0, 1} and {2, 3}; group 1 is all wrong.
    # confidences c = pi_old: .5, .5 | .2, .6 ; G = 2
    # group 0 (mixed): D = max([(1/2)(1/.5)]^-1 = 1, 2 x .5 = 1) = 1 ; r~ = (1, -(1/2) .5/.5) = (1, -.5)
    #   centred (.75, -.75), unbiased std 1.06066 -> A = (.707107, -.707107)
    # group 1 (negative): D = 2 x .6 = 1.2 ; r~ = -(1/2)(.2/1, .6/.6) = (-.1, -.5) ; centred (.2, -.2)
    #   de-meaned only, x alpha = .25 -> A = (.05, -.05)
    # seq-mean-token-mean of -A r: grad = -A / 4
    old = torch.tensor([[L(0.5)], [L(0.5)], [L(0.2)], [L(0.6)]], dtype=D)
    inp = PolicyLossInput(logp=old.clone().requires_grad_(True), old_logp=old, advantages=torch.zeros(4, 1, dtype=D),
                          mask=torch.ones(4, 1, dtype=D), rewards=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D),
                          group_index=torch.tensor([0, 0, 1, 1]))
    loss, _ = _loss("lens", inp, std_eps=0.0)
    (grad,) = torch.autograd.grad(loss, inp.logp)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(grad, torch.tensor([[-a], [a], [-0.05], [0.05]], dtype=D) / 4)
    # plain GRPO rewards would give group 1 zero advantage; LENS penalises the confident mistake (c = .6)
    assert grad[3, 0] > 0


# ------------------------------------------------------------------ fixed points (exact harness)

from loss_helpers import CORRECT, REF  # noqa: E402
from loss_helpers import ref_given_correct as _ref_given_correct  # noqa: E402


def test_topr_reaches_topr_fixed_point_offline():
    """Offline (fixed behaviour policy mu = pi_ref, rewards +-1, A = R), TOPR's objective is
    bounded (Sec. 3, arXiv:2503.14286): the truncated negative term vanishes as pi(wrong) -> 0 and
    the positive term is SFT on the positives, maximised by mu conditioned on R > 0."""
    bandit = Bandit(rewards=2.0 * CORRECT - 1.0, ref_logits=REF)
    logits = REF.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(60):
        opt.zero_grad()
        exact_expectation("topr", logits, bandit, old_logits=REF, advantage="reward").backward()
        opt.step()
    assert total_variation(torch.softmax(logits.detach(), -1), _ref_given_correct()) < 0.02


def test_nsr_reaches_nsr_fixed_point():
    """NSR only lowers wrong answers (Sec. 4, arXiv:2506.01347): mass leaves the wrong answers and
    is redistributed to the correct ones in proportion to pi_ref. With the harness's Adam every
    correct logit moves by the same step, so the proportions are kept exactly up to tolerance."""
    bandit = Bandit(rewards=CORRECT, ref_logits=REF)
    p = solve("nsr", bandit, beta=0.0, steps=60, lr=0.3)
    assert total_variation(p, _ref_given_correct()) < 0.02


def test_nsr_plain_gradient_removes_wrong_mass_and_keeps_the_order():
    """Under plain gradient descent the NSR logit step of a correct answer is pi_k pi(wrong): the
    wrong mass still goes to 0 and the order of the correct answers is kept, but the more likely
    ones gain relatively more (the redistribution is proportional only to first order)."""
    bandit = Bandit(rewards=CORRECT, ref_logits=REF)
    logits = REF.clone().requires_grad_(True)
    for _ in range(400):
        (grad,) = torch.autograd.grad(exact_expectation("nsr", logits, bandit), logits)
        with torch.no_grad():
            logits -= 4.0 * grad
        if (torch.softmax(logits, -1) * (1 - CORRECT)).sum(-1).max() < 0.02:
            break
    p = torch.softmax(logits.detach(), -1)
    assert (p * (1 - CORRECT)).sum(-1).max() < 0.02
    q = _ref_given_correct()
    for row in range(2):
        idx = CORRECT[row].nonzero().squeeze(-1)
        assert torch.equal(torch.argsort(p[row, idx]), torch.argsort(q[row, idx]))
    # row 0: pi_ref order of correct answers 2 > 0 > 4; their ratio 2:4 sharpens
    assert p[0, 2] / p[0, 4] > q[0, 2] / q[0, 4]


# ------------------------------------------------------------------ LENS on all-wrong groups (exact harness)

# prompt 0 has correct answers 1 and 3; prompt 1 is an all-wrong ("negative") group
LENS_BANDIT = Bandit(rewards=torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=D),
                     ref_logits=REF)


def test_lens_exact_gradient_is_nonzero_on_the_all_wrong_prompt_where_grpo_is_zero():
    """The claim of arXiv:2510.08696: GRPO gives an all-wrong group zero advantage, hence zero
    gradient; LENS's confidence-weighted penalty makes the group informative. Exact expected
    gradients over every answer: GRPO's row for prompt 1 is exactly 0, LENS's is not, and LENS
    lowers the logit of the most confident mistake (the pi_ref argmax, answer 0 of prompt 1)."""
    grpo = exact_gradient("grpo", REF, LENS_BANDIT)
    lens = exact_gradient("lens", REF, LENS_BANDIT, loss_kwargs=dict(confidence="sequence"))
    assert grpo[1].abs().max() == 0 and grpo[0].abs().max() > 0
    assert lens[1].abs().max() > 1e-3
    top = int(REF[1].argmax())
    assert lens[1, top] > 0  # gradient descent lowers it
    assert lens[1].sum().abs() < 1e-12  # softmax logits: the update only redistributes mass


def test_lens_reaches_lens_fixed_point_uniform_on_all_wrong_prompt():
    """Fixed point of LENS (on-policy, c = pi_old(y|x)): on an all-wrong prompt the calibrated
    reward -(1/G) c/(D - c), D = 2 max c, is equal for all answers only when pi is uniform, and it is decreasing in c,
    so mass flows from confident to unconfident mistakes -- the iterate reaches the uniform policy
    (the group baseline and the per-group std only rescale, so the unweighted group statistics of
    the enumeration give the same fixed point). On prompt 0 the wrong answers lose their mass."""
    p = solve("lens", LENS_BANDIT, beta=0.0, steps=300, lr=0.1, confidence="sequence")
    uniform = torch.full((5,), 0.2, dtype=D)
    assert total_variation(p[1], uniform) < 0.02
    assert total_variation(torch.softmax(REF[1], -1), uniform) > 0.2  # it had to move
    assert (p[0] * (1 - LENS_BANDIT.rewards[0])).sum() < 0.02
