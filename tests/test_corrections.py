"""Training-inference corrections (catalogue A8): hand values, the identity when sampler == learner,
and exact-harness checks with a deliberately mismatched sampler (tempered or stale pi).

On the exact harness the completions are weighted by the SAMPLER mu (``old_logits``), the learner
is pi, and the corrected REINFORCE surrogate -w A log pi(y) (A = r) is compared with the on-policy
gradient E_pi[r grad log pi]. Gradient norms are Frobenius norms over the [S, V] logits table,
where ||grad log pi(y)|| <= sqrt(2 T) for a T-token completion (each token adds e_y - p_s, norm^2 <= 2).
"""
import math

import pytest
import torch

from tilt.corrections import CORRECTIONS
from tilt.exact import exact_expectation, exact_gradient, make_bandit, make_tree, policy_input

D = torch.float64
LEARNER = torch.log(torch.tensor([[0.5, 0.25, 0.3]], dtype=D))
SAMPLER = torch.log(torch.tensor([[0.25, 0.5, 0.9]], dtype=D))
MASK = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)  # the last token is padding
# log rho = [log 2, -log 2, (masked)], rho = [2, .5]; rho_seq = 1


def test_hand_values():
    w, m = CORRECTIONS.get("token_tis")(LEARNER, SAMPLER, MASK, clip_max=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 0.0]], dtype=D))
    # k3 = rho - 1 - log rho: 2 - 1 - .693147 = .306853 ; .5 - 1 + .693147 = .193147 ; mean .25
    assert m["mismatch/k3"].item() == pytest.approx(0.25, abs=1e-12)
    assert m["mismatch/log_ratio_abs_max"].item() == pytest.approx(math.log(2), abs=1e-12)
    w, m = CORRECTIONS.get("token_mis")(LEARNER, SAMPLER, MASK, clip_max=1.5)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 0.0]], dtype=D))
    assert m["mismatch/masked_frac"].item() == pytest.approx(0.5)
    w, _ = CORRECTIONS.get("icepop")(LEARNER, SAMPLER, MASK, low=0.6)  # .5 < .6 is dropped, 2 is kept
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0, 0.0]], dtype=D))
    for name in ("sequence_tis", "sequence_mis"):  # rho_seq = 2 x .5 = 1 on both tokens
        w, _ = CORRECTIONS.get(name)(LEARNER, SAMPLER, MASK, clip_max=1.5)
        torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0]], dtype=D))
    w, _ = CORRECTIONS.get("sequence_mis")(LEARNER, SAMPLER, MASK, clip_max=0.9)  # 1 > .9: dropped
    assert (w == 0).all()
    w, m = CORRECTIONS.get("geo_rs")(LEARNER, SAMPLER, MASK)  # geometric mean exp(0) = 1: kept
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0]], dtype=D))
    w, _ = CORRECTIONS.get("geo_rs")(LEARNER, SAMPLER + torch.tensor([[0.0, -0.2, 0.0]], dtype=D), MASK)
    assert (w == 0).all()  # exp(mean(log 2, -log 2 + .2)) = e^.1 > 1.001


@pytest.mark.parametrize("name", CORRECTIONS.names())
def test_identity_when_sampler_equals_learner(name):
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 5, 6, generator=g, dtype=D), -1)[..., 0]
    mask = torch.tensor([[1.0] * k + [0.0] * (5 - k) for k in (5, 3, 1, 4)], dtype=D)
    w, m = CORRECTIONS.get(name)(logp, logp.clone(), mask)
    torch.testing.assert_close(w, mask)
    assert m["mismatch/k3"].item() == 0.0 and m["mismatch/masked_frac"].item() == 0.0


def _corrected(name, **hypers):
    """REINFORCE -w A log pi with the correction's weight (learner = current pi, sampler = inp.old_logp)."""
    fn = CORRECTIONS.get(name)

    def call(inp):
        w, _ = fn(inp.logp.detach(), inp.old_logp, inp.mask, **hypers)
        return -w * inp.advantages * inp.logp

    return call


def _problems():
    bandit = make_bandit(n_prompts=2, n_answers=5, seed=3)
    tree = make_tree(depth=3, vocab=3, seed=1)
    return [("bandit", bandit, 1), ("tree", tree, 3)]


def _mismatched(problem, kind):
    """(learner logits, sampler logits): a tempered sampler (tau = 1.5) or a stale one (an older table)."""
    g = torch.Generator().manual_seed(7)
    learner = problem.ref_logits + 0.8 * torch.randn(problem.ref_logits.shape, generator=g, dtype=D)
    sampler = learner / 1.5 if kind == "tempered" else problem.ref_logits
    return learner, sampler


def _grads(problem, learner, sampler, call):
    on = exact_gradient("reinforce", learner, problem, advantage="reward")
    off = exact_gradient(call, learner, problem, advantage="reward", old_logits=sampler)
    return on, off


def _seq_rho(problem, learner, sampler):
    """Sequence ratio pi(y)/mu(y) [N] and the sampler weights p(x) mu(y|x) [N]."""
    inp, w = policy_input(problem, learner, old_logits=sampler, advantage="reward")
    return torch.exp((inp.logp - inp.old_logp).sum(-1)).detach(), w


@pytest.mark.parametrize("kind", ["tempered", "stale"])
@pytest.mark.parametrize("name", ["sequence_tis", "sequence_mis"])
def test_untruncated_sequence_is_is_unbiased(name, kind):
    """E_mu[rho_seq r grad log pi] = E_pi[r grad log pi] exactly when nothing is truncated or masked."""
    for _, problem, _ in _problems():
        learner, sampler = _mismatched(problem, kind)
        on, off = _grads(problem, learner, sampler, _corrected(name, clip_max=1e12))
        assert on.abs().max() > 1e-3
        torch.testing.assert_close(off, on, rtol=0, atol=1e-10)
        _, naive = _grads(problem, learner, sampler, _corrected("none"))
        assert (naive - on).norm() > 1e-2  # the mismatch matters: no correction is biased


@pytest.mark.parametrize("name", ["token_tis", "token_mis", "icepop"])
def test_token_level_is_unbiased_for_one_token_only(name):
    """Per-token ratios correct the last token's distribution but not the prefix's: unbiased on the
    bandit (one token), biased on a 3-token tree."""
    hypers = {"low": 1e-12, "high": 1e12} if name == "icepop" else {"clip_max": 1e12}
    (_, bandit, _), (_, tree, _) = _problems()
    learner, sampler = _mismatched(bandit, "tempered")
    on, off = _grads(bandit, learner, sampler, _corrected(name, **hypers))
    torch.testing.assert_close(off, on, rtol=0, atol=1e-10)
    learner, sampler = _mismatched(tree, "tempered")
    on, off = _grads(tree, learner, sampler, _corrected(name, **hypers))
    assert (off - on).norm() > 1e-3


@pytest.mark.parametrize("kind", ["tempered", "stale"])
def test_truncated_sequence_is_bias_is_bounded(kind):
    """sequence_tis at C: bias = E_mu[(rho - C)^+ r grad log pi], so
    ||bias|| <= max|r| sqrt(2T) E_mu[(rho - C)^+] (Ionides 2008); the bound binds non-trivially here."""
    for _, problem, t in _problems():
        learner, sampler = _mismatched(problem, kind)
        rho, w = _seq_rho(problem, learner, sampler)
        c = float(rho.quantile(0.7))  # truncate the top 30% of completions' ratios
        excess = (w * (rho - c).clamp(min=0)).sum()
        assert excess > 1e-4
        on, off = _grads(problem, learner, sampler, _corrected("sequence_tis", clip_max=c))
        bias = (off - on).norm()
        bound = problem.enumerate().rewards.abs().max() * math.sqrt(2 * t) * excess
        assert 1e-6 < bias <= bound


@pytest.mark.parametrize("kind", ["tempered", "stale"])
def test_masked_sequence_is_bias_is_bounded(kind):
    """sequence_mis with band [C_min, C]: bias = -E_mu[rho 1{rho outside} r grad log pi], so
    ||bias|| <= max|r| sqrt(2T) P_pi(rho outside the band)."""
    for _, problem, t in _problems():
        learner, sampler = _mismatched(problem, kind)
        rho, w = _seq_rho(problem, learner, sampler)
        lo, hi = float(rho.quantile(0.15)), float(rho.quantile(0.85))
        outside = (rho < lo) | (rho > hi)
        p_out = (w * rho * outside).sum()  # E_mu[rho 1{outside}] = P_pi(outside)
        assert p_out > 1e-4
        on, off = _grads(problem, learner, sampler, _corrected("sequence_mis", clip_min=lo, clip_max=hi))
        bias = (off - on).norm()
        assert 1e-6 < bias <= problem.enumerate().rewards.abs().max() * math.sqrt(2 * t) * p_out


def test_expected_loss_is_finite_with_a_far_sampler():
    """A sampler far from the learner (ratios up to e^10) gives finite, bounded corrected losses."""
    (_, tree, _) = _problems()[1]
    learner, _ = _mismatched(tree, "tempered")
    sampler = learner * 5.0
    for name in CORRECTIONS.names():
        value = exact_expectation(_corrected(name), learner, tree, advantage="reward", old_logits=sampler)
        assert torch.isfinite(value)
