"""Next-token decoding rules (tilt.decoding): hand-computed values and closed-form equalities."""
import math

import pytest
import torch

from tilt.decoding import DECODERS, rules
from tilt.registry import UnknownNameError

P = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
LOGITS = P.log()


def probs(name, logits=LOGITS, **kw):
    return DECODERS.get(name)(logits, **kw).exp()


def test_sample_is_softmax_over_temperature():
    # T=2: p_i^(1/2) / sum = (.7071, .5477, .4472) / 1.7020 = (.4155, .3218, .2628)
    out = probs("sample", temperature=2.0)
    expected = torch.tensor([0.70711, 0.54772, 0.44721], dtype=torch.float64) / 1.70204
    assert torch.allclose(out, expected[None], atol=1e-4)


def test_greedy_is_point_mass_on_argmax():
    assert probs("greedy").tolist() == [[1.0, 0.0, 0.0]]


def test_top_k_renormalises_the_k_largest():
    # k=2 keeps .5 and .3 -> (.5/.8, .3/.8) = (.625, .375)
    assert torch.allclose(probs("top_k", k=2), torch.tensor([[0.625, 0.375, 0.0]], dtype=torch.float64))


def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    # p=.6: cumulative mass before tokens = (0, .5, .8); drop where > .6 -> keep {.5, .3}
    assert torch.allclose(probs("top_p", p=0.6), torch.tensor([[0.625, 0.375, 0.0]], dtype=torch.float64))
    # p=.5: mass before token 1 is .5, not > .5, so it stays (same rule as tilt.rollout._pick)
    assert torch.allclose(probs("top_p", p=0.5), torch.tensor([[0.625, 0.375, 0.0]], dtype=torch.float64))
    assert torch.allclose(probs("top_p", p=0.4), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))


def test_min_p_threshold_is_relative_to_max():
    # p=.5: keep prob >= .25 -> {.5, .3}; p=.4: keep >= .2 -> all three
    assert torch.allclose(probs("min_p", p=0.5), torch.tensor([[0.625, 0.375, 0.0]], dtype=torch.float64))
    assert torch.allclose(probs("min_p", p=0.4), P)


def test_bregman_alpha_one_is_top_k():
    logits = torch.randn(4, 7, dtype=torch.float64)
    for k in (1, 3, 7):
        assert torch.allclose(probs("bregman", logits, alpha=1.0, k=k), probs("top_k", logits, k=k), atol=1e-12)


def test_bregman_alpha_renormalisations_by_hand():
    # alpha=2: q_i = p_i + nu (Euclidean projection): (.5 + .1, .3 + .1) = (.6, .4)
    assert torch.allclose(probs("bregman", alpha=2.0, k=2), torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    # alpha=3: q_i = sqrt(p_i^2 + nu): .25 + nu + sqrt-sum = 1 -> nu = .0864, q = (.58, .42)
    # (check: .58^2 - .25 = .0864 = .42^2 - .09)
    assert torch.allclose(probs("bregman", alpha=3.0, k=2), torch.tensor([[0.58, 0.42, 0.0]], dtype=torch.float64))
    # alpha=.5: q_i = (p_i^-1/2 + nu)^-2 moves mass toward the larger token: q_0 > .625
    q = probs("bregman", alpha=0.5, k=2)[0]
    nu0 = q[0] ** -0.5 - 0.5 ** -0.5
    nu1 = q[1] ** -0.5 - 0.3 ** -0.5
    assert q[0] > 0.625 and abs(nu0 - nu1) < 1e-9 and abs(q.sum() - 1) < 1e-12


def test_bregman_adaptive_k_minimises_divergence_plus_lam_k():
    # alpha=1, D = sum_S q log(q/p) - q + p  +  sum_{not S} p.
    # k=1: log 2 - 1 + .5 + .5 = .6931; k=2: log 1.25 - 1 + .8 + .2 = .2231; k=3: 0.
    # lam=.1 -> costs .7931, .4231, .3000 -> k=3;  lam=.3 -> .9931, .8231, .9 -> k=2
    assert torch.allclose(probs("bregman", alpha=1.0, lam=0.1), P)
    assert torch.allclose(probs("bregman", alpha=1.0, lam=0.3), torch.tensor([[0.625, 0.375, 0.0]], dtype=torch.float64))


def test_exclude_is_the_kl_projection():
    # ban token 0: (.3, .2) / .5 = (.6, .4); equals the masked softmax
    assert torch.allclose(probs("exclude", banned=[0]), torch.tensor([[0.0, 0.6, 0.4]], dtype=torch.float64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        probs("exclude", banned=[3])


def test_guided_is_pi_ref_times_exp_q_over_beta():
    q = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    # beta=1: (.5, .3*2, .2) / 1.3 = (.3846, .4615, .1538)
    out = probs("qsharp", values=q, beta=1.0, top_k=None)
    assert torch.allclose(out, torch.tensor([[0.5, 0.6, 0.2]], dtype=torch.float64) / 1.3)
    # top_k=2 keeps tokens 0, 1: (.5, .6) / 1.1
    out = probs("qsharp", values=q, beta=1.0, top_k=2)
    assert torch.allclose(out, torch.tensor([[0.5, 0.6, 0.0]], dtype=torch.float64) / 1.1)


def test_every_decoder_returns_a_distribution():
    logits = torch.randn(5, 9, dtype=torch.float64)
    values = torch.randn(5, 9, dtype=torch.float64)
    kwargs = {"top_k": {"k": 3}, "top_p": {"p": 0.7}, "min_p": {"p": 0.1}, "bregman": {"k": 4, "alpha": 1.5},
              "exclude": {"banned": [1, 2]}}
    for name in DECODERS:
        if DECODERS.entry(name).meta["kind"] != "token":
            continue
        out = DECODERS.get(name)(logits, values=values, **kwargs.get(name, {})).exp()  # [5, 9]
        assert torch.allclose(out.sum(-1), torch.ones(5, dtype=torch.float64)), name


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        probs("top_k", k=4)
    with pytest.raises(ValueError, match="beta must be > 0"):
        probs("qsharp", values=torch.zeros_like(LOGITS), beta=0.0)
    with pytest.raises(ValueError, match="needs a value model"):
        probs("qsharp", beta=1.0)
    with pytest.raises(ValueError, match="exactly one of k"):
        probs("bregman")
    with pytest.raises(UnknownNameError, match="valid names"):
        DECODERS.get("beam")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        probs("sample", temperature=0.0)


def test_bregman_renormalisation_is_the_constrained_minimiser():
    """No feasible perturbation on the support lowers D_alpha(q, p): the KKT solution is the optimum."""
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(1, 6, generator=gen, dtype=torch.float64), -1)
    for alpha in (0.5, 1.0, 1.5, 3.0):
        q = rules.bregman_logp(p.log(), alpha=alpha, k=3).exp()  # [1, 6]
        support = q > 0
        best = rules.bregman_divergence(q, p, alpha=alpha).item()
        for _ in range(200):
            d = torch.randn(1, 6, generator=gen, dtype=torch.float64) * support
            d = (d - d.sum() / 3 * support) * 1e-3  # sum zero on the support
            q2 = q + d
            if (q2[support] > 0).all():
                assert rules.bregman_divergence(q2, p, alpha=alpha).item() >= best - 1e-15


def test_bregman_adaptive_scan_is_capped_by_max_k():
    # lam = .1 picks k = 3 (see above); with max_k = 2 only k in {1, 2} are scanned -> k = 2 (.4231 < .7931)
    assert torch.allclose(probs("bregman", alpha=1.0, lam=0.1, max_k=2),
                          torch.tensor([[0.625, 0.375, 0.0]], dtype=torch.float64))


def test_sequence_selectors_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5], [2.0, -1.0, 0.0]])
    assert DECODERS.get("best_of_n")(scores, n=3).tolist() == [1, 0]
    # resample: beta -> 0 is best-of-n; one-hot-ish scores at beta = 1 give softmax frequencies
    assert DECODERS.get("resample")(scores, n=3, beta=1e-4).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    two = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2)  # P(pick 1) = 3 / 4
    frac = DECODERS.get("resample")(two, n=2, beta=1.0, generator=gen).double().mean().item()
    assert abs(frac - 0.75) < 0.015  # 3 s.e. = 3 * sqrt(.1875 / 20000) = .009
    assert DECODERS.entry("best_of_n").meta["kind"] == "sequence"
    assert DECODERS.entry("qsharp").meta["values"] == "soft_q"
    assert DECODERS.entry("controlled").meta["values"] == DECODERS.entry("transfer_q").meta["values"] == "expected_reward"
