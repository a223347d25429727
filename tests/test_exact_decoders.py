"""Decoders on the exact tree sample from pi* (catalogue E1-E5, E7): enumerated distributions vs closed forms."""
import itertools
import math

import pytest
import torch

from tilt.decoding import DECODERS
from tilt.exact import (TokenTree, best_of_n_kl_bound, best_of_n_probs, blockwise_sequences, decoded_sequences,
                        future_return_q, make_tree, resample_probs, sequence_probs, tilted_distribution,
                        total_variation)
from tilt.exact.decoders import kl

BETAS = (0.1, 0.5, 2.0)


def own_tree() -> TokenTree:
    """Depth 4, binary vocabulary, sparse reward r = 1 iff at least three 1-tokens (like a verifier)."""
    gen = torch.Generator().manual_seed(11)
    paths = torch.tensor(list(itertools.product([0, 1], repeat=4)), dtype=torch.float64)  # [16, 4]
    rewards = (paths.sum(-1) >= 3).to(torch.float64).reshape(2, 2, 2, 2)
    return TokenTree(depth=4, vocab=2, rewards=rewards, ref_logits=torch.randn(15, 2, generator=gen, dtype=torch.float64))


TREES = {"exact_tree": make_tree(), "depth3": make_tree(depth=3, vocab=3, seed=4), "own_depth4": own_tree()}


@pytest.mark.parametrize("tree_name", TREES)
@pytest.mark.parametrize("name", ["qsharp", "controlled", "transfer_q"])
def test_token_guidance_with_exact_q_samples_pi_star(tree_name, name):
    tree = TREES[tree_name]
    for beta in BETAS:
        if name == "transfer_q":  # Q from roll-outs of the aligned model pi* (KL-regularised return)
            q = future_return_q(tree, tree.optimal_policy(beta), beta=beta)
            assert torch.allclose(q, tree.soft_q(beta), atol=1e-12)
        else:
            q = tree.soft_q(beta)
        seq = decoded_sequences(tree, DECODERS.get(name), values=q, beta=beta)  # [1, Y]
        assert total_variation(seq, tilted_distribution(tree, beta)) < 1e-9


def test_unregularised_scorers_do_not_sample_pi_star():
    """CD's E_ref[r | s, a] and TQ*'s E_pi*[r | s, a] without the KL term are not Q*: TV > 0 (why Q♯ uses Q*)."""
    tree, beta = make_tree(depth=3, vocab=3, seed=4), 0.1
    target = tilted_distribution(tree, beta)
    ref = torch.softmax(tree.ref_logits, -1)
    for q in (future_return_q(tree, ref, beta=beta, kl_correction=False),
              future_return_q(tree, tree.optimal_policy(beta), beta=beta, kl_correction=False)):
        assert total_variation(decoded_sequences(tree, DECODERS.get("controlled"), values=q, beta=beta), target) > 1e-3


@pytest.mark.parametrize("tree_name", TREES)
def test_blockwise_controlled_decoding_samples_pi_star(tree_name):
    tree = TREES[tree_name]
    for beta in BETAS:
        for block in range(1, tree.depth + 1):
            seq = blockwise_sequences(tree, tree.soft_q(beta), beta=beta, block=block)
            assert total_variation(seq, tilted_distribution(tree, beta)) < 1e-9


def test_blockwise_with_one_block_is_sequence_level_tilt_by_hand():
    # one block = whole sequence: pi(y) ∝ pi_ref(y) exp(r(y)/beta) for ANY q table whose last level is r
    tree = make_tree()
    q = torch.zeros_like(tree.ref_logits)
    q[1:] = tree.rewards.reshape(3, 3)
    assert total_variation(blockwise_sequences(tree, q, beta=0.3, block=2), tilted_distribution(tree, 0.3)) < 1e-12


def _ref_seq(tree):
    return sequence_probs(tree, torch.softmax(tree.ref_logits, -1))[0]  # [Y]


def test_best_of_n_closed_form_equals_enumeration_of_all_draws():
    tree = make_tree()
    p, r = _ref_seq(tree), tree.enumerate().rewards  # [9], [9]
    r = torch.cat([r[:4], r[:1], r[5:]])  # a tie between sequences 0 and 4
    for n in (1, 2, 3):
        brute = torch.zeros_like(p)
        for draw in itertools.product(range(p.numel()), repeat=n):
            best = max(draw, key=lambda i: (r[i].item(), -draw.index(i)))  # first draw among the best
            brute[best] += math.prod(p[i].item() for i in draw)
        assert torch.allclose(best_of_n_probs(p, r, n), brute, atol=1e-14)
    assert torch.allclose(best_of_n_probs(p, r, 1), p)


def test_best_of_n_kl_exact_value_and_bound():
    # Uniform p over M items with distinct rewards: P(i) = (i/M)^n - ((i-1)/M)^n, KL -> log n - (n-1)/n.
    # n = 2, M = 2: P = (1/4, 3/4); KL = 1/4 log(1/2) + 3/4 log(3/2) = -.17329 + .30410 = .13081
    p2 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    bon = best_of_n_probs(p2, torch.tensor([0.0, 1.0], dtype=torch.float64), 2)
    assert torch.allclose(bon, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert abs(kl(bon, p2).item() - 0.1308120) < 1e-6
    m = 4000
    pu = torch.full((m,), 1.0 / m, dtype=torch.float64)
    for n in (2, 4, 16):
        exact = kl(best_of_n_probs(pu, torch.arange(m, dtype=torch.float64), n), pu).item()
        assert exact <= best_of_n_kl_bound(n) and best_of_n_kl_bound(n) - exact < 5e-3
    tree = TREES["depth3"]
    p, r = _ref_seq(tree), tree.enumerate().rewards
    for n in (2, 4, 8):
        assert kl(best_of_n_probs(p, r, n), p).item() <= best_of_n_kl_bound(n) + 1e-12


def test_q_probe_resampling_equals_finite_k_closed_form():
    tree = make_tree()
    p, s = _ref_seq(tree), tree.enumerate().rewards  # scores = a probe that recovers r exactly
    beta = 0.2
    w = torch.exp(s / beta)
    for k in (1, 2, 3):
        brute = torch.zeros_like(p)
        for draw in itertools.product(range(p.numel()), repeat=k):  # ordered draws
            prob = math.prod(p[i].item() for i in draw)
            total = sum(w[i].item() for i in draw)
            for i in draw:
                brute[i] += prob * w[i].item() / total
        assert torch.allclose(resample_probs(p, s, beta=beta, k=k), brute, atol=1e-14)
    assert torch.allclose(resample_probs(p, s, beta=beta, k=1), p)
    target = tilted_distribution(tree, beta)[0]
    tvs = [0.5 * (resample_probs(p, s, beta=beta, k=k) - target).abs().sum().item() for k in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs  # approaches the tilt as k grows


def test_top_k_and_bregman_decoded_sequences_equal_their_closed_forms():
    tree = TREES["depth3"]
    ref = torch.softmax(tree.ref_logits, -1)  # [S, V]
    for k in (1, 2, 3):
        keep = ref >= ref.topk(k, -1).values[:, -1:]
        closed = sequence_probs(tree, torch.where(keep, ref, 0.0) / torch.where(keep, ref, 0.0).sum(-1, keepdim=True))
        assert total_variation(decoded_sequences(tree, DECODERS.get("top_k"), k=k), closed) < 1e-12
        assert total_variation(decoded_sequences(tree, DECODERS.get("bregman"), k=k, alpha=1.0), closed) < 1e-12
    # alpha = 2 (Euclidean): q = p + (1 - sum_S p) / k on the top-k support, closed form
    keep = ref >= ref.topk(2, -1).values[:, -1:]
    euclid = torch.where(keep, ref + (1 - torch.where(keep, ref, 0.0).sum(-1, keepdim=True)) / 2, 0.0)
    seq = decoded_sequences(tree, DECODERS.get("bregman"), k=2, alpha=2.0)
    assert total_variation(seq, sequence_probs(tree, euclid)) < 1e-12
