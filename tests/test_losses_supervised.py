"""B5 PACS, B6 NFT, B9 REDI: hand-computed values and fixed points."""
import math

import pytest
import torch

from tilt.exact.solve import single_thread
from tilt.batch import PolicyLossInput
from tilt.exact import Bandit, TokenTree, exact_expectation, exact_gradient, group_mean, solve, total_variation
from tilt.losses import LOSSES
from tilt.losses.policy import spread
from tilt.losses.supervised import balanced_class_weights, nft_per_token, pacs_bce, pacs_score
from loss_helpers import reduced_loss as _loss

D = torch.float64
L = math.log




def _one_token(log_ratios, rewards, groups):
    old = torch.full((len(rewards), 1), L(0.3), dtype=D)
    logp = (old + torch.tensor(log_ratios, dtype=D)[:, None]).requires_grad_(True)
    return PolicyLossInput(logp=logp, old_logp=old, advantages=torch.zeros_like(old), mask=torch.ones_like(old),
                           rewards=torch.tensor(rewards, dtype=D), group_index=torch.tensor(groups))


def test_balanced_class_weights_match_sklearn_formula():
    # group 0: 1 positive, 2 negatives, n = 3 -> n / (2 * count): 3/2 = 1.5 and 3/4 = 0.75 ; group 1 single class -> 1
    w = balanced_class_weights(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D), torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(w, torch.tensor([1.5, 0.75, 0.75, 1.0], dtype=D))


def test_pacs_value():
    # beta = 1, scores r^ = log-ratios (.4, -.2, .1 | .3), groups {0,1,2} and the singleton {3}
    # RLOO psi: .4 - (-.2 + .1)/2 = .45 ; -.2 - (.4 + .1)/2 = -.45 ; .1 - (.4 - .2)/2 = 0 ; singleton .3 - 0 = .3
    # labels (1, 0, 0 | 1), weights (1.5, .75, .75 | 1)
    # BCE: 1.5 log(1 + e^-.45) = 1.5 log 1.637628 = 1.5 * 0.493249 = 0.739873 ; .75 * 0.493249 = 0.369937
    #      .75 log 2 = 0.519860 ; log(1 + e^-.3) = log 1.740818 = 0.554355 ; mean = 2.184025 / 4 = 0.546006
    inp = _one_token([0.4, -0.2, 0.1, 0.3], [1.0, 0.0, 0.0, 1.0], [0, 0, 0, 1])
    loss, _ = _loss("pacs", inp)
    expected = (1.5 * L(1 + math.exp(-0.45)) + 0.75 * L(1 + math.exp(-0.45)) + 0.75 * L(2) + L(1 + math.exp(-0.3))) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.546006, abs=1e-6)


def test_pacs_spreads_sequence_loss_over_tokens():
    # two tokens with log-ratios .25 each give the same score .5 as one token with .5
    old = torch.full((2, 2), L(0.3), dtype=D)
    logp = old + torch.tensor([[0.25, 0.25], [-0.1, 9.0]], dtype=D)
    inp = PolicyLossInput(logp=logp, old_logp=old, advantages=torch.zeros_like(old),
                          mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D),
                          rewards=torch.tensor([1.0, 0.0], dtype=D), group_index=torch.tensor([0, 0]))
    # psi = (.5 - (-.1), -.1 - .5) = (.6, -.6), labels (1, 0), weights 1:
    # mean(log(1 + e^-.6), log(1 + e^-.6)) = log(1 + e^-.6) = 0.437488
    assert _loss("pacs", inp)[0].item() == pytest.approx(L(1 + math.exp(-0.6)), abs=1e-12)


def test_nft_value_and_gradient_preserving_clamp():
    # one group, labels (1, 0, 0, 1) -> r_q = .5 ; ratios R = (.8, .5, 1.5, 1.25)
    # positives: -log R = .223144 and -.223144
    # negatives: proxy (1 - .5 R) / .5 = 2 - R: R = .5 -> 1.5 -> -log 1.5 = -.405465 ;
    #            R = 1.5 -> .5, floored at 1 (value) -> -log 1 = 0
    # times (1 - r_q) = .5, sum / (N * L_max) = (.111572 - .202733 + 0 - .111572) / 4 = -0.050683
    inp = _one_token([L(0.8), L(0.5), L(1.5), L(1.25)], [1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0])
    loss, _ = _loss("nft", inp)
    assert loss.item() == pytest.approx(0.5 * (-L(0.8) - L(1.5) - L(1.25)) / 4, abs=1e-12)
    assert loss.item() == pytest.approx(-0.050683, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, inp.logp)
    # d/dlogp (x .5 / 4): positives -dR/R = -1 -> -.125 ; R = .5: rq R / ((1 - rq) proxy) = .25/.75 -> .041667 ;
    # R = 1.5 (floored, gradient kept with denominator 1): rq R / (1 - rq) = 1.5 -> .1875
    torch.testing.assert_close(grad, torch.tensor([[-0.125], [0.5 / 12], [0.1875], [-0.125]], dtype=D))


def test_nft_on_policy_gradient_equals_grpo_with_r_minus_rq():
    """At R = 1 NFT's gradient is -(r - r_q) grad log pi per token, scaled by 1/N (Sec. 5, arXiv:2505.18116)."""
    inp = _one_token([0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0])
    (grad,) = torch.autograd.grad(_loss("nft", inp)[0], inp.logp)
    # r_q = .25: positive -(1 - .25) ; negatives rq R / (1 - rq) * (1 - rq) = .25 ; all / 4
    torch.testing.assert_close(grad, torch.tensor([[-0.75], [0.25], [0.25], [0.25]], dtype=D) / 4)


def test_redi_value():
    # row0 positive: -(ln .5 + ln .25) / 2 = 2.079442 / 2 = 1.039721
    # row1 negative, one real token: .8 ln .2 = .8 (-1.609438) = -1.287550 ; mean = -0.123915
    logp = torch.tensor([[L(0.5), L(0.25)], [L(0.2), 50.0]], dtype=D)
    inp = PolicyLossInput(logp=logp, old_logp=logp, advantages=torch.zeros_like(logp),
                          mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D),
                          rewards=torch.tensor([1.0, 0.0], dtype=D))
    loss, _ = _loss("redi", inp)
    assert loss.item() == pytest.approx((-(L(0.5) + L(0.25)) / 2 + 0.8 * L(0.2)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(-0.123915, abs=1e-6)


# ------------------------------------------------------------------ fixed points (exact harness)

from loss_helpers import CORRECT, REF  # noqa: E402
from loss_helpers import ref_given_correct as _ref_given_correct  # noqa: E402


def test_pacs_reaches_pacs_fixed_point():
    """PACS's BCE gradient at psi = 0 is -beta E[(r - 1/2) grad log pi] up to positive class
    weights: a policy gradient on the binary reward (Sec. 4, arXiv:2509.02522), whose fixed points
    put no mass on wrong answers. Infinite groups: the RLOO baseline is E_pi_old[r^] and the
    balanced weights are 1/(2p), 1/(2(1-p)) with p = P(correct | x)."""
    bandit = Bandit(rewards=CORRECT, ref_logits=REF)
    enum = bandit.enumerate()

    def pacs_infinite_group(inp):
        w = enum.prompt_prob * torch.exp(inp.old_logp.sum(-1))  # [N] sampling weights
        y = inp.rewards
        score = pacs_score(inp.logp, inp.old_logp, inp.mask, beta=1.0)  # [N]
        psi = score - group_mean(score, w, enum)  # [N]
        p = group_mean(y, w, enum)  # [N]
        weights = torch.where(y > 0, 1 / (2 * p), 1 / (2 * (1 - p)))  # [N]
        return spread(pacs_bce(psi, y, weights), inp.mask)

    probs = solve(pacs_infinite_group, bandit, beta=0.0, steps=60, lr=0.3, mode="seq-mean-token-sum")
    assert (probs * (1 - CORRECT)).sum(-1).max() < 0.02


def test_nft_reaches_nft_fixed_point_offline():
    """With pi_old fixed, NFT is maximum likelihood of pi_old = r_q pi+ + (1 - r_q) pi- (Eq. 5,
    arXiv:2505.18116); its optimum is the positive policy pi+ = pi_old 1[correct] / r_q, i.e.
    pi_ref restricted to the correct answers, proportionally."""
    bandit = Bandit(rewards=CORRECT, ref_logits=REF)
    enum = bandit.enumerate()

    def nft_exact_rate(inp):
        w = enum.prompt_prob * torch.exp(inp.old_logp.sum(-1))  # [N]
        rate = group_mean(inp.rewards, w, enum)  # [N] exact r_q = pi_old(correct | x)
        return nft_per_token(inp.logp, inp.old_logp, inp.mask, inp.rewards > 0.5, rate)

    logits = REF.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(60):
        opt.zero_grad()
        exact_expectation(nft_exact_rate, logits, bandit, old_logits=REF, mode="seq-mean-token-sum-norm").backward()
        opt.step()
    assert total_variation(torch.softmax(logits.detach(), -1), _ref_given_correct()) < 0.02


# ------------------------------------------------------------------ REDI asymmetric weighting (exact harness)

one_thread = single_thread  # scoped single intra-op thread for loops of tiny ops


def _redi_pair_tree():
    """Depth 2, vocab 2: the positive trace (0, 0) and the negative trace (0, 1) share token 0.
    Teacher data (the fixed sampling table): root always emits 0, then 0 or 1 with 1/2 each, so
    the offline data is pairs (y+, y-) in equal shares. The student starts uniform."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D)
    tree = TokenTree(depth=2, vocab=2, rewards=rewards, ref_logits=torch.zeros(3, 2, dtype=D))
    teacher = torch.tensor([[0.0, -30.0], [0.0, 0.0], [0.0, 0.0]], dtype=D)  # [S, V]
    return tree, teacher


def test_redi_exact_gradient_on_shared_prefix_hand_value():
    # E[loss] = 1/2 * (-(log pi(0) + log pi(0|0)) / 2) + 1/2 * (alpha (log pi(0) + log pi(1|0)) / 2)
    # coefficient of log pi(0|root): (alpha - 1) / 4 ; d log pi(0) / d z_root = e_0 - pi = (.5, -.5)
    # alpha = .8: (-.2 / 4) * (.5, -.5) = (-.025, .025) -> descent raises the shared token
    tree, teacher = _redi_pair_tree()
    g = exact_gradient("redi", tree.ref_logits, tree, old_logits=teacher, loss_kwargs=dict(alpha=0.8))
    torch.testing.assert_close(g[0], torch.tensor([-0.025, 0.025], dtype=D))
    g = exact_gradient("redi", tree.ref_logits, tree, old_logits=teacher, loss_kwargs=dict(alpha=1.0))
    assert g[0].abs().max() < 1e-12  # symmetric weights: no net push on the shared prefix (teacher e^-30 aside)


def _redi_positive_likelihood(alpha, steps=120):
    tree, teacher = _redi_pair_tree()
    logits = tree.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    with one_thread():
        for _ in range(steps):
            opt.zero_grad()
            exact_expectation("redi", logits, tree, old_logits=teacher, loss_kwargs=dict(alpha=alpha)).backward()
            opt.step()
    p = torch.softmax(logits.detach(), -1)  # [S, V]
    return float(p[0, 0] * p[1, 0])  # pi(y+) = pi(0 | root) pi(0 | (0,))


def test_redi_asymmetric_weighting_keeps_the_positive_likelihood_from_collapsing():
    """REDI's claim (asymmetric weighting, arXiv:2505.24850): with alpha < 1 the negative traces
    cannot drag the positive likelihood down. Offline on the exact tree (teacher pairs sharing
    their first token), the shared token carries net weight (1 - alpha)/L toward the positive:
    alpha = 0.8 drives pi(y+) from 0.25 to above 0.9; alpha = 1 leaves the shared token where it
    was (pi(y+) -> 0.5, only the last token moves); alpha = 1.25 pushes the shared prefix down and
    the positive likelihood collapses below its start although y+ itself is never penalised."""
    assert _redi_positive_likelihood(0.8) > 0.9
    assert _redi_positive_likelihood(1.0) == pytest.approx(0.5, abs=0.02)
    assert _redi_positive_likelihood(1.25) < 0.1
