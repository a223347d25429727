"""E7 dual Bregman decoders and the binary search for k (arXiv:2505.19371): hand values, KKT, scan = search."""
import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from tilt.cli import app
from tilt.decoding import DECODERS, rules
from tilt.exact import decoded_sequences, make_tree, sequence_probs, total_variation

P = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)


def probs(logits=P.log(), **kw):
    return DECODERS.get("bregman")(logits, **kw).exp()


def test_dual_renormalisation_by_hand():
    # dual KKT on S: q_i^(a-2) (q_i - p_i) = nu.
    # a=2: q_i = p_i + nu, 2 nu = 1 - (.5 + .3) -> nu = .1, q = (.6, .4) (D = ||q-p||^2 / 2 is symmetric)
    assert torch.allclose(probs(alpha=2.0, k=2, mode="dual"), torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    # a=3: q_0^2 - .5 q_0 = q_1^2 - .3 q_1 with q_1 = 1 - q_0 -> -.5 q_0 = 1 - 2 q_0 - .3 + .3 q_0
    # -> q_0 (2 - .5 - .3) = .7 -> q_0 = 7/12, q_1 = 5/12 (check: 49/144 - 3.5/12 = .0486 = 25/144 - 1.5/12)
    # -- not the primal's (.58, .42)
    assert torch.allclose(probs(alpha=3.0, k=2, mode="dual"),
                          torch.tensor([[7 / 12, 5 / 12, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(probs(alpha=3.0, k=2, mode="primal"), torch.tensor([[0.58, 0.42, 0.0]], dtype=torch.float64))


def test_dual_alpha_one_is_top_k():
    # a=1: (q_i - p_i) / q_i = nu -> q_i = p_i / (1 - nu): plain renormalisation. The solver does not
    # special-case a=1, so this checks the derivation's KL case numerically.
    logits = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 7):
        top_k = DECODERS.get("top_k")(logits, k=k).exp()
        assert torch.allclose(probs(logits, alpha=1.0, k=k, mode="dual"), top_k, atol=1e-12)


def test_dual_renormalisation_is_the_constrained_minimiser():
    """No feasible perturbation on the support lowers D_alpha(p, q): the KKT point is the optimum."""
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(1, 6, generator=gen, dtype=torch.float64), -1)
    for alpha in (1.0, 1.5, 2.0, 3.0, 5.0):
        q = probs(p.log(), alpha=alpha, k=3, mode="dual")  # [1, 6]
        support = q > 0
        assert support.sum() == 3
        best = rules.bregman_divergence(p, q, alpha=alpha).item()
        for _ in range(200):
            d = torch.randn(1, 6, generator=gen, dtype=torch.float64) * support
            d = (d - d.sum() / 3 * support) * 1e-3  # sum zero on the support
            q2 = q + d
            if (q2[support] > 0).all():
                assert rules.bregman_divergence(p, q2, alpha=alpha).item() >= best - 1e-15


def test_dual_best_support_is_the_top_k():
    """The paper's greedy result for the dual: over all C(6, k) supports, the top-k one has the least D(p, q)."""
    p = torch.softmax(torch.randn(1, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64), -1)
    for alpha, k in itertools.product((1.5, 3.0), (2, 4)):
        costs = {}
        for s in itertools.combinations(range(6), k):
            support = torch.zeros(1, 6, dtype=torch.bool)
            support[0, list(s)] = True
            costs[s] = rules.bregman_divergence(p, rules.dual_alpha_renormalize(p, support, alpha=alpha), alpha=alpha)
        top = tuple(sorted(p[0].argsort(descending=True)[:k].tolist()))
        assert min(costs, key=costs.get) == top


def test_dual_adaptive_k_by_hand():
    # a=2: D(p, q) = ||p - q||^2 / 2.  k=1: q = (1, 0, 0): (.25 + .09 + .04) / 2 = .19;
    # k=2: q = (.6, .4, 0): (.01 + .01 + .04) / 2 = .03;  k=3: 0.
    # lam=.02 -> .21, .07, .06 -> k=3;  lam=.1 -> .29, .23, .30 -> k=2;  lam=.2 -> .39, .43, .60 -> k=1
    assert torch.allclose(probs(alpha=2.0, lam=0.02, mode="dual"), P)
    assert torch.allclose(probs(alpha=2.0, lam=0.1, mode="dual"), torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    assert torch.allclose(probs(alpha=2.0, lam=0.2, mode="dual"), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    # a=3: d(p, q) = (p - q)^2 (p + 2q) / 6 per token; k=2 (q = (7/12, 5/12)): (1/12)^2 (.5 + 7/6) / 6
    # + (7/60)^2 (.3 + 5/6) / 6 + .2^3 / 6 = .0019290 + .0025710 + .0013333 = .0058333;  k=3: 0.
    _, cost = rules.sparse_bregman(P, torch.tensor([2]), alpha=3.0, mode="dual")
    assert abs(cost.item() - 0.0058333) < 1e-6


def divergences(p: torch.Tensor, *, alpha: float, mode: str, max_k: int) -> torch.Tensor:
    """D(q_k) of the best top-k-supported q for every k = 1..max_k, [K, N] (the linear scan's work)."""
    n = p.shape[0]
    return torch.stack([rules.sparse_bregman(p, torch.full((n,), j), alpha=alpha, mode=mode)[1]
                        for j in range(1, max_k + 1)])


@pytest.mark.parametrize("mode,alpha", [("primal", 0.5), ("primal", 1.0), ("primal", 3.0),
                                        ("dual", 1.5), ("dual", 3.0)])
def test_binary_search_finds_the_scanned_k_and_the_cost_is_convex_in_k(mode, alpha):
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64).repeat(4)[:, None]  # flat to peaked rows
    p = torch.softmax(torch.randn(16, 10, generator=gen, dtype=torch.float64) * scale, -1)  # [16, 10]
    div = divergences(p, alpha=alpha, mode=mode, max_k=10)  # [10, 16]
    chosen = set()
    for lam in (1e-4, 1e-3, 1e-2, 5e-2):
        costs = div + lam * torch.arange(1, 11, dtype=torch.float64)[:, None]  # [10, 16] C(k) = D + lam k
        assert ((costs[2:] - 2 * costs[1:-1] + costs[:-2]) >= -1e-10).all()  # discrete convexity in k
        k_scan = costs.argmin(0) + 1  # [16] the linear scan: first minimiser
        out = rules.bregman_logp(p.log(), alpha=alpha, lam=lam, mode=mode, max_k=10).exp()  # [16, 10]
        k_search = (out > 0).sum(-1)
        assert torch.equal(k_search, k_scan)
        chosen |= set(k_scan.tolist())
        q, _ = rules.sparse_bregman(p, k_scan, alpha=alpha, mode=mode)
        assert torch.allclose(out, q, atol=1e-14)
    assert len(chosen) >= 3, chosen  # the lams span several k: the comparison is not trivial


def test_dual_decoded_sequences_equal_their_closed_forms():
    tree = make_tree(depth=3, vocab=3, seed=4)
    ref = torch.softmax(tree.ref_logits, -1)  # [S, V]
    top2 = ref.topk(2, -1)
    # a=3, k=2 (see the hand test): q_first = (1 - p_second) / (2 - p_first - p_second), q_second = 1 - q_first
    first = (1 - top2.values[:, 1]) / (2 - top2.values.sum(-1))  # [S]
    table = torch.zeros_like(ref).scatter(-1, top2.indices, torch.stack([first, 1 - first], -1))
    seq = decoded_sequences(tree, DECODERS.get("bregman"), k=2, alpha=3.0, mode="dual")
    assert total_variation(seq, sequence_probs(tree, table)) < 1e-12
    # a=1: plain top-k
    keep = ref >= ref.topk(2, -1).values[:, -1:]
    topk = torch.where(keep, ref, 0.0) / torch.where(keep, ref, 0.0).sum(-1, keepdim=True)
    seq = decoded_sequences(tree, DECODERS.get("bregman"), k=2, alpha=1.0, mode="dual")
    assert total_variation(seq, sequence_probs(tree, topk)) < 1e-12


def test_bregman_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be 'primal' or 'dual'"):
        probs(k=2, mode="swapped")
    with pytest.raises(ValueError, match="needs alpha >= 1"):
        probs(k=2, alpha=0.5, mode="dual")
    with pytest.raises(ValueError, match="needs alpha > 1"):
        probs(lam=0.1, alpha=1.0, mode="dual")
    with pytest.raises(ValueError, match="max_k must be a positive integer"):
        probs(lam=0.1, max_k=0)


def test_cli_decode_runs_the_adaptive_dual_decoder(tiny_llama_dir, tmp_path):
    out = tmp_path / "c.jsonl"
    res = CliRunner().invoke(app, ["decode", str(tiny_llama_dir), "--decode", "bregman", "--decode-kwargs",
                                   '{"mode": "dual", "alpha": 2.0, "lam": 0.001, "max_k": 8}', "--tasks",
                                   "addition:1", "--per-cell", "2", "--n", "1", "--max-new-tokens", "3",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["decoder"] == "bregman" and lines[0]["kl_to_ref"] >= 0.0
