"""B10 reverse-KL distillation (MiniLLM's per-position term) and KDRL: values and fixed points."""
import math

import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.exact import make_bandit, make_tree, sequence_probs, solve, total_variation
from tilt.losses import LOSSES
from tilt.losses.distill import reverse_kl
from loss_helpers import reduced_loss as _loss

D = torch.float64
L = math.log




def _inp():
    # token 0: student p = softmax(0, ln 3) = (.25, .75), teacher q = (.5, .5); token 1: student = teacher
    logits = torch.tensor([[[0.0, L(3.0)], [1.0, 2.0], [80.0, -80.0]]], dtype=D).requires_grad_(True)
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-60.0, 60.0]]], dtype=D)
    logp = torch.log_softmax(logits, -1)[..., 0]  # [1, 3] token 0 sampled at each position
    return PolicyLossInput(logp=logp, old_logp=logp.detach(), advantages=torch.tensor([[0.5, 0.5, 30.0]], dtype=D),
                           mask=torch.tensor([[1.0, 1.0, 0.0]], dtype=D), logits=logits, teacher_logits=teacher)


def test_reverse_kl_formula():
    # KL(p || q) = .25 ln(.25/.5) + .75 ln(.75/.5) = .25 (-0.693147) + .75 (0.405465) = 0.130812
    p = torch.tensor([0.0, L(3.0)], dtype=D)
    assert reverse_kl(p, torch.zeros(2, dtype=D)).item() == pytest.approx(0.25 * L(0.5) + 0.75 * L(1.5), abs=1e-12)
    assert reverse_kl(p, torch.zeros(2, dtype=D)).item() == pytest.approx(0.130812, abs=1e-6)


def test_reverse_kl_distill_value_and_gradient():
    # token-mean over the 2 real tokens: (0.130812 + 0) / 2 = 0.065406
    inp = _inp()
    loss, metrics = _loss("reverse_kl_distill", inp)
    kl0 = 0.25 * L(0.5) + 0.75 * L(1.5)
    assert loss.item() == pytest.approx(kl0 / 2, abs=1e-12)
    assert metrics["kd/reverse_kl"].item() == pytest.approx(kl0 / 2)
    (grad,) = torch.autograd.grad(loss, inp.logits)
    # dKL/dz_k = p_k (log p_k/q_k - KL): (.25 (-0.693147 - 0.130812), .75 (0.405465 - 0.130812))
    #          = (-0.205990, 0.205990), halved by the token mean; zero on token 1 (p = q) and on padding
    g0 = 0.25 * (L(0.5) - kl0) / 2
    torch.testing.assert_close(grad, torch.tensor([[[g0, -g0], [0.0, 0.0], [0.0, 0.0]]], dtype=D))


def test_kdrl_value_adds_grpo_and_teacher_kl():
    # ratio 1, A = .5: GRPO part -.5 per token -> sequence mean -.5 ; KL part .1 * (0.130812 + 0) / 2 = 0.006541
    # total -0.493459
    loss, _ = _loss("kdrl", _inp(), kd_coef=0.1)
    assert loss.item() == pytest.approx(-0.5 + 0.1 * (0.25 * L(0.5) + 0.75 * L(1.5)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(-0.493459, abs=1e-6)


# ------------------------------------------------------------------ fixed points (exact harness)


def test_kdrl_reaches_tilted_optimum_with_teacher_reference():
    """On a bandit, E[r] - c KL(pi || pi_T) is the KL-regularised objective with the teacher as
    reference, so KDRL's fixed point is pi_T exp(r / c) / Z (arXiv:2506.02208, unified objective)."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    teacher = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=D)
    coef = 0.5
    p = solve("kdrl", bandit, beta=0.0, steps=60, lr=0.3, teacher_logits=teacher, init_logits=teacher, kd_coef=coef)
    target = torch.softmax(torch.log_softmax(teacher, -1) + bandit.rewards / coef, -1)
    assert total_variation(p, target) < 0.02


def test_reverse_kl_distill_reaches_teacher_fixed_point():
    """Per-position reverse KL is minimised (0) only by pi(.|s) = pi_T(.|s) at every visited
    state; on the bandit and on the token tree (every prefix is visited) that is the teacher."""
    gen = torch.Generator().manual_seed(6)
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    teacher = torch.randn(2, 4, generator=gen, dtype=D)
    p = solve("reverse_kl_distill", bandit, beta=0.0, steps=60, lr=0.3, teacher_logits=teacher)
    assert total_variation(p, torch.softmax(teacher, -1)) < 0.02
    tree = make_tree(depth=2, vocab=3, seed=0)
    teacher = torch.randn(tree.n_states, 3, generator=gen, dtype=D)
    p = solve("reverse_kl_distill", tree, beta=0.0, steps=200, lr=0.3, teacher_logits=teacher)
    assert total_variation(sequence_probs(tree, p), sequence_probs(tree, torch.softmax(teacher, -1))) < 0.02
