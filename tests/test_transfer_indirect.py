"""E3 Transfer Q*'s indirect transfer (arXiv:2405.20495 Sec. 3.2): Q for a target reward r from a
baseline rho_BL aligned to a DIFFERENT reward r_BL, reweighted by its implicit reward. Checked against
pi* ∝ pi_ref exp(r/beta) on exact trees; direct transfer with the same baseline misses it."""
from __future__ import annotations

import math

import pytest
import torch

from tilt.decoding import DECODERS
from tilt.exact import (TokenTree, decoded_sequences, future_return_q, indirect_transfer_q, make_needle_tree,
                        make_tree, sequence_probs, tilted_distribution, total_variation)

BETAS = (0.1, 0.5, 2.0)
TREES = {"exact_tree": make_tree(), "depth3": make_tree(depth=3, vocab=3, seed=4), "needle": make_needle_tree()}


def baseline_for_other_reward(tree: TokenTree, *, beta_bl: float, seed: int = 7) -> torch.Tensor:
    """rho_BL: the exact optimum of the same pi_ref for another reward r_BL (uniform random) at beta_BL, [S, V]."""
    r_bl = torch.rand(tree.rewards.shape, generator=torch.Generator().manual_seed(seed), dtype=tree.rewards.dtype)
    return TokenTree(depth=tree.depth, vocab=tree.vocab, rewards=r_bl, ref_logits=tree.ref_logits).optimal_policy(beta_bl)


def test_indirect_transfer_by_hand():
    # depth 2, V = 2, pi_ref uniform, r(0, .) = [0, 1], r(1, .) = [0, 0], beta = 1
    # baseline rows: state (0) -> [0.8, 0.2], state (1) -> [0.3, 0.7]
    # Q(root, 0) = log E_rho[(pi_ref / rho) e^r] = log(0.8 * 0.5/0.8 * e^0 + 0.2 * 0.5/0.2 * e^1) = log((1 + e) / 2)
    # Q(root, 1) = log(0.5 + 0.5) = 0; plain: E_pi*[r | 0] = e / (1 + e), E_pi*[r | 1] = 0
    tree = TokenTree(depth=2, vocab=2, rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
                     ref_logits=torch.zeros(3, 2, dtype=torch.float64))
    rho = torch.tensor([[0.5, 0.5], [0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    q = indirect_transfer_q(tree, rho, beta=1.0)
    torch.testing.assert_close(q[0], torch.tensor([math.log((1 + math.e) / 2), 0.0], dtype=torch.float64))
    torch.testing.assert_close(q[1:], tree.rewards)  # last level: Q = r
    plain = indirect_transfer_q(tree, rho, beta=1.0, kl_correction=False)
    torch.testing.assert_close(plain[0], torch.tensor([math.e / (1 + math.e), 0.0], dtype=torch.float64))


@pytest.mark.parametrize("tree_name", TREES)
def test_indirect_transfer_from_a_baseline_of_another_reward_samples_pi_star(tree_name):
    """Exact quantities: Q equals Q* (1e-9) and pi_ref exp(Q/beta) decodes pi* (TV < 1e-9), for every
    beta and a baseline aligned to another reward at another beta_BL; direct transfer from the same
    baseline (its KL-regularised return) does not (measured TV 0.0037-0.76; smallest at beta = 2, beta_BL = 1)."""
    tree = TREES[tree_name]
    for beta in BETAS:
        for beta_bl in (0.2, 1.0):
            rho = baseline_for_other_reward(tree, beta_bl=beta_bl)
            q = indirect_transfer_q(tree, rho, beta=beta)
            assert torch.allclose(q, tree.soft_q(beta), atol=1e-9)
            target = tilted_distribution(tree, beta)
            seq = decoded_sequences(tree, DECODERS.get("transfer_q"), values=q, beta=beta)
            assert total_variation(seq, target) < 1e-9
            plain = indirect_transfer_q(tree, rho, beta=beta, kl_correction=False)  # E_pi*[r | s, a]
            assert torch.allclose(plain, future_return_q(tree, tree.optimal_policy(beta), beta=beta,
                                                         kl_correction=False), atol=1e-9)
            direct = future_return_q(tree, rho, beta=beta)
            assert total_variation(decoded_sequences(tree, DECODERS.get("transfer_q"), values=direct, beta=beta),
                                   target) > 3e-3


def test_indirect_transfer_from_baseline_samples_estimates_q_star():
    """The estimator needs only samples of rho_BL and its log-ratio to pi_ref: 20000 continuations
    per first token give Q(root, a) = beta log mean_i (pi_ref / rho_BL)(tau_i) e^{r(tau_i)/beta} within 0.02 of Q*."""
    tree, beta = make_tree(depth=3, vocab=3, seed=4), 0.5
    rho = baseline_for_other_reward(tree, beta_bl=0.2)
    p_bl = sequence_probs(tree, rho)[0]  # [Y]
    p_ref = sequence_probs(tree, torch.softmax(tree.ref_logits, -1))[0]  # [Y]
    r = tree.rewards.reshape(-1)  # [Y]
    gen = torch.Generator().manual_seed(0)
    per_first = tree.vocab ** (tree.depth - 1)
    q_star = tree.soft_q(beta)[0]  # [V]
    for a in range(tree.vocab):
        block = slice(a * per_first, (a + 1) * per_first)  # sequences starting with a
        cond_bl = p_bl[block] / p_bl[block].sum()  # rho_BL(tau | a)
        cond_ref = p_ref[block] / p_ref[block].sum()  # pi_ref(tau | a)
        draws = torch.multinomial(cond_bl, 20000, replacement=True, generator=gen)  # [n]
        w = (cond_ref[draws] / cond_bl[draws]) * torch.exp(r[block][draws] / beta)  # [n]
        assert abs(beta * math.log(float(w.mean())) - float(q_star[a])) < 0.02
