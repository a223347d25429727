"""KL estimators (A1), Tsallis KL (A3) and critical-token KL (A7): values, Monte Carlo,
and the gradients each induces, checked exactly by enumeration (arXiv:2505.17508)."""
import math

import pytest
import torch

from tilt.kl import (
    KL_ESTIMATORS,
    categorical_kl,
    kl_penalty,
    q_log,
    reference_certainty,
    tsallis_kl,
)
from tilt.registry import UnknownNameError

D = torch.float64
LOG = math.log


def _t(*xs):
    return torch.tensor([list(xs)], dtype=D)


# ---------------------------------------------------------------- hand values
def test_k1_k2_k3_hand_values():
    # pi = 0.5, pi_ref = 0.25: log r = log 2 = 0.693147
    # k1 = 0.693147; k2 = 0.5 * 0.693147^2 = 0.240227; k3 = rho - 1 - log rho, rho = 0.5:
    # 0.5 - 1 + 0.693147 = 0.193147
    lp, ref = _t(LOG(0.5)), _t(LOG(0.25))
    assert KL_ESTIMATORS.get("k1")(lp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert KL_ESTIMATORS.get("k2")(lp, ref).item() == pytest.approx(0.240227, abs=1e-6)
    assert KL_ESTIMATORS.get("k3")(lp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    assert KL_ESTIMATORS.get("low_var_kl")(lp, ref).item() == pytest.approx(0.193147, abs=1e-6)


def test_low_var_kl_clamps_like_verl():
    # log rho = ref - logp. 25 -> clamp 20 -> e^20 - 21 = 4.85e8 -> clamp 10
    # -25 -> clamp -20 -> e^-20 - 1 + 20 = 19.000000 -> clamp 10; 2 -> e^2 - 3 = 4.389056 (no clamp)
    lp = _t(0.0, 0.0, 0.0)
    ref = _t(25.0, -25.0, 2.0)
    out = KL_ESTIMATORS.get("low_var_kl")(lp, ref)
    assert torch.allclose(out, _t(10.0, 10.0, 4.389056), atol=1e-6)
    assert torch.isfinite(out).all()


def test_full_kl_hand_value_and_needs_logits():
    # KL((.5,.5) || (.25,.75)) = .5 log 2 + .5 log(.5/.75) = 0.346574 - 0.202733 = 0.143841
    logits = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=D))
    ref_logits = torch.log(torch.tensor([[[0.25, 0.75]]], dtype=D))
    out = KL_ESTIMATORS.get("full")(_t(0.0), _t(0.0), logits=logits, ref_logits=ref_logits)
    assert out.item() == pytest.approx(0.143841, abs=1e-6)
    with pytest.raises(ValueError, match="needs logits"):
        KL_ESTIMATORS.get("full")(_t(0.0), _t(0.0))


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: critical, full, k1"):
        KL_ESTIMATORS.get("k4")


def test_kl_penalty_placements():
    # beta = 0.1, k3 = 0.193147 -> loss +0.0193147 (with grad), reward -0.0193147 (detached)
    lp = _t(LOG(0.5)).requires_grad_(True)
    ref = _t(LOG(0.25))
    as_loss = kl_penalty(lp, ref, estimator="k3", beta=0.1, placement="loss")
    as_reward = kl_penalty(lp, ref, estimator="k3", beta=0.1, placement="reward")
    assert as_loss.item() == pytest.approx(0.0193147, abs=1e-7) and as_loss.requires_grad
    assert as_reward.item() == pytest.approx(-0.0193147, abs=1e-7) and not as_reward.requires_grad
    with pytest.raises(ValueError, match="placement"):
        kl_penalty(lp, ref, beta=0.1, placement="advantage")


# ---------------------------------------------------------------- Monte Carlo vs enumeration
def _pair(v=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=gen, dtype=D), torch.randn(v, generator=gen, dtype=D)


@pytest.mark.parametrize("seed", [0, 1])
def test_monte_carlo_means_match_exact_expectations(seed):
    """1e5 samples y ~ pi: mean of k within 4 standard errors of sum_y pi(y) k(y); k1 and k3
    are unbiased for KL(pi || pi_ref), k2 for E_pi[0.5 (log pi/pi_ref)^2]."""
    logits, ref_logits = _pair(seed=seed)
    logp_all, ref_all = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    kl = categorical_kl(logits, ref_logits)
    gen = torch.Generator().manual_seed(100 + seed)
    y = torch.multinomial(logp_all.exp(), 100_000, replacement=True, generator=gen)
    for name, target in (("k1", kl), ("k3", kl), ("k2", None)):
        est = KL_ESTIMATORS.get(name)
        exact = (logp_all.exp() * est(logp_all, ref_all)).sum()
        if target is not None:
            assert torch.allclose(exact, target, atol=1e-12)
        samples = est(logp_all[y], ref_all[y])
        se = samples.std() / math.sqrt(samples.numel())
        assert abs(samples.mean() - exact) < 4 * se


@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_every_estimator_monte_carlo_mean_matches_enumeration(name):
    """For every registered estimator: the mean over 1e5 samples y ~ pi is within 4 standard
    errors of its exact expectation sum_y pi(y) k(y) (full-logit estimators, constant in y,
    match to 1e-12)."""
    logits, ref_logits = _pair(seed=3)
    logp_all, ref_all = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)  # [V]
    v = logits.shape[-1]
    est = KL_ESTIMATORS.get(name)

    def k(idx):  # estimator values at sampled tokens idx [M], as a [1, M] "sequence"
        m = idx.numel()
        return est(logp_all[idx][None], ref_all[idx][None], logits=logits.expand(1, m, v),
                   ref_logits=ref_logits.expand(1, m, v))[0]

    exact = (logp_all.exp() * k(torch.arange(v))).sum()
    gen = torch.Generator().manual_seed(7)
    samples = k(torch.multinomial(logp_all.exp(), 100_000, replacement=True, generator=gen))
    se = samples.std() / math.sqrt(samples.numel())
    assert abs(samples.mean() - exact) <= 4 * se + 1e-12


def test_k2_bias_is_third_order():
    """E_pi[k2] - KL(pi||pi_ref) = E_pi[0.5 L^2 - L], L = log pi/pi_ref. For pi = pi_ref e^(eps h)/Z
    both agree to second order, so halving eps divides the gap by ~2^3 = 8."""
    ref_logits, h = _pair(v=5, seed=3)

    def gap(eps):
        logits = ref_logits + eps * h
        lp, lr = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        k2_mean = (lp.exp() * 0.5 * (lp - lr) ** 2).sum()
        return (k2_mean - categorical_kl(logits, ref_logits)).item()

    ratio = gap(0.02) / gap(0.01)
    assert 7.0 < ratio < 9.0


# ---------------------------------------------------------------- induced gradients (exact)
def _grad_of(fn):
    logits, ref_logits = _pair(seed=4)
    theta = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta, ref_logits), theta)
    return g


def _expected_loss_term(name, weighted=False):
    """sum_y sg(pi(y)) * l(y): the exact expectation of a per-sample loss term, samples from pi.
    weighted=True multiplies by w = pi/sg(pi) (RPG's importance weight)."""
    def fn(theta, ref_logits):
        lp, lr = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
        k = KL_ESTIMATORS.get(name)(lp, lr)
        w = torch.exp(lp - lp.detach()) if weighted else 1.0
        return (lp.exp().detach() * w * k).sum()
    return fn


def _rkl(theta, ref_logits):
    return categorical_kl(theta, ref_logits)


def _fkl(theta, ref_logits):
    return categorical_kl(ref_logits, theta)


def test_k1_as_loss_term_has_zero_expected_gradient():
    # E_pi[grad log pi - 0] = sum grad pi = 0
    assert torch.allclose(_grad_of(_expected_loss_term("k1")), torch.zeros(6, dtype=D), atol=1e-12)


def test_k2_as_loss_term_gives_reverse_kl_gradient():
    # E_pi[(log pi/pi_ref) grad log pi] = grad KL(pi || pi_ref)
    assert torch.allclose(_grad_of(_expected_loss_term("k2")), _grad_of(_rkl), atol=1e-12)


def test_k3_as_loss_term_gives_forward_kl_gradient():
    """GRPO's k3 term without importance weight: E_pi[(1 - pi_ref/pi) grad log pi]
    = -sum pi_ref grad log pi = grad KL(pi_ref || pi) (RPG's GRPO KL-term mismatch)."""
    g = _grad_of(_expected_loss_term("k3"))
    assert torch.allclose(g, _grad_of(_fkl), atol=1e-12)
    assert not torch.allclose(g, _grad_of(_rkl), atol=1e-3)


def test_importance_weighted_k3_gives_reverse_kl_gradient():
    """With w = pi/pi_old the k3 term is UKL(pi || pi_ref) = KL for normalised pi (RPG, App. B)."""
    assert torch.allclose(_grad_of(_expected_loss_term("k3", weighted=True)), _grad_of(_rkl), atol=1e-12)


def test_k1_in_reward_gives_reverse_kl_gradient():
    # score function: E_pi[sg(k1) grad log pi] = grad KL(pi || pi_ref)
    def fn(theta, ref_logits):
        lp, lr = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
        return (lp.exp().detach() * (lp - lr).detach() * lp).sum()
    assert torch.allclose(_grad_of(fn), _grad_of(_rkl), atol=1e-12)


def test_k3_is_exactly_the_unnormalised_kl():
    """E_m[k3] = sum m log(m/r) - sum m + sum r = UKL(m || r) for any positive measures m, r
    (RPG App. B), checked with unnormalised m."""
    m = torch.tensor([0.3, 0.9, 0.2], dtype=D)
    r = torch.tensor([0.5, 0.4, 0.6], dtype=D)
    e_k3 = (m * KL_ESTIMATORS.get("k3")(m.log(), r.log())).sum()
    ukl = (m * (m / r).log()).sum() - m.sum() + r.sum()
    assert torch.allclose(e_k3, ukl, atol=1e-14)


# ---------------------------------------------------------------- A3 Tsallis
def test_q_log_hand_values_and_q1():
    # ln_2(x) = 1 - 1/x: ln_2(0.5) = -1; ln_0.5(4) = (4^0.5 - 1)/0.5 = 2
    assert q_log(torch.tensor(LOG(0.5), dtype=D), 2.0).item() == pytest.approx(-1.0)
    assert q_log(torch.tensor(LOG(4.0), dtype=D), 0.5).item() == pytest.approx(2.0)
    assert q_log(torch.tensor(LOG(3.0), dtype=D), 1.0).item() == pytest.approx(LOG(3.0))


def test_tsallis_hand_values():
    # sample: -ln_2(pi_ref/pi) = 1/x - 1 with x = 0.25/0.5 = 0.5 -> 1
    assert KL_ESTIMATORS.get("tsallis")(_t(LOG(0.5)), _t(LOG(0.25)), q=2.0).item() == pytest.approx(1.0)
    # exact D_2((.5,.5) || (.25,.75)) = .5*1 + .5*(1/1.5 - 1) = 0.5 - 0.166667 = 0.333333
    # (= chi^2: .25/.25 + .25/.75 - 1)
    p = torch.log(torch.tensor([0.5, 0.5], dtype=D))
    r = torch.log(torch.tensor([0.25, 0.75], dtype=D))
    assert tsallis_kl(p, r, q=2.0).item() == pytest.approx(1.0 / 3.0)


def test_tsallis_q1_equals_kl_and_is_continuous():
    logits, ref_logits = _pair(seed=7)
    kl = categorical_kl(logits, ref_logits)
    assert torch.allclose(tsallis_kl(logits, ref_logits, q=1.0), kl, atol=1e-14)
    assert torch.allclose(tsallis_kl(logits, ref_logits, q=1.0 + 1e-7), kl, atol=1e-6)
    lp, lr = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    assert torch.allclose(KL_ESTIMATORS.get("tsallis")(lp, lr, q=1.0), lp - lr)
    # unbiased: E_pi[-ln_q(pi_ref/pi)] = D_q
    assert torch.allclose((lp.exp() * KL_ESTIMATORS.get("tsallis")(lp, lr, q=1.7)).sum(),
                          tsallis_kl(logits, ref_logits, q=1.7), atol=1e-12)


# ---------------------------------------------------------------- A7 critical tokens
def test_reference_certainty_hand_values():
    # pi_ref = (.7, .1, .1, .1): max_prob 0.7; negentropy_max_prob = 1 + log .7 / log 4
    # = 1 - 0.356675/1.386294 = 0.742713; negentropy = 1 - H/log 4,
    # H = -(.7 log .7 + 3 * .1 log .1) = 0.249672 + 0.690776 = 0.940448 -> 1 - 0.678390 = 0.321610
    ref_logits = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1]]], dtype=D))
    assert reference_certainty(ref_logits, kind="max_prob").item() == pytest.approx(0.7)
    assert reference_certainty(ref_logits, kind="negentropy_max_prob").item() == pytest.approx(0.742713, abs=1e-6)
    assert reference_certainty(ref_logits, kind="negentropy").item() == pytest.approx(0.321610, abs=1e-6)


def test_critical_kl_hand_value_and_limits():
    # weight = (1 - (-0.5)) * 0.7^1 - 0.5 = 0.55; k3 = 0.193147 -> 0.106231
    ref_logits = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1]]], dtype=D))
    out = KL_ESTIMATORS.get("critical")(_t(LOG(0.5)), _t(LOG(0.25)), ref_logits=ref_logits,
                                        exponent=1.0, intercept=-0.5)
    assert out.item() == pytest.approx(0.106231, abs=1e-6)
    # a fully certain reference keeps the whole penalty; exponent 0 recovers the plain estimator
    sure = torch.tensor([[[0.0, -1e4, -1e4, -1e4]]], dtype=D)
    full_weight = KL_ESTIMATORS.get("critical")(_t(LOG(0.5)), _t(LOG(0.25)), ref_logits=sure)
    assert full_weight.item() == pytest.approx(0.193147, abs=1e-6)
    assert KL_ESTIMATORS.get("critical")(_t(LOG(0.5)), _t(LOG(0.25)), ref_logits=ref_logits,
                                         exponent=0.0).item() == pytest.approx(0.193147, abs=1e-6)
    with pytest.raises(ValueError, match="intercept"):
        KL_ESTIMATORS.get("critical")(_t(0.0), _t(0.0), ref_logits=ref_logits, intercept=0.5)


# ---------------------------------------------------------------- invariances
def _batch(n=2, t=3, v=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=gen, dtype=D)
    ref_logits = torch.randn(n, t, v, generator=gen, dtype=D)
    tok = torch.randint(0, v, (n, t), generator=gen)
    lp = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
    lr = torch.log_softmax(ref_logits, -1).gather(-1, tok[..., None])[..., 0]
    return logits, ref_logits, lp, lr


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "low_var_kl", "full", "tsallis", "critical"])
def test_padding_changes_nothing_and_gradients(name):
    logits, ref_logits, lp, lr = _batch()
    est = KL_ESTIMATORS.get(name)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=D)
    base = est(lp, lr, logits=logits, ref_logits=ref_logits)
    # pad one column of garbage: the masked mean over real tokens is unchanged
    pad = lambda x, val: torch.cat([x, torch.full(x.shape[:1] + (1,) + x.shape[2:], val, dtype=D)], 1)  # noqa: E731
    big = est(pad(lp, -3.0), pad(lr, 2.0), logits=pad(logits, 5.0), ref_logits=pad(ref_logits, -5.0))
    big_mask = torch.cat([mask, torch.zeros(2, 1, dtype=D)], 1)
    assert torch.allclose((big * big_mask).sum(), (base * mask).sum(), atol=1e-12)
    # masked == selected-only: the first sequence's two real tokens alone give the same values
    alone = est(lp[:1, :2], lr[:1, :2], logits=logits[:1, :2], ref_logits=ref_logits[:1, :2])
    assert torch.allclose(alone, base[:1, :2], atol=1e-14)
    if name in ("full",):
        theta = logits.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: est(lp, lr, logits=x, ref_logits=ref_logits), (theta,))
    else:
        x = lp.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda y: est(y, lr, logits=logits, ref_logits=ref_logits), (x,))
