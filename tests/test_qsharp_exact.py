"""E2 Q♯ on the exact tree: Q from the reward distribution, learned from sampled data, decodes toward pi*."""
import math
import statistics

import torch

from tilt.decoding.qsharp import TabularZ, qsharp_exact, soft_q_bernoulli, soft_q_from_atoms
from tilt.exact import make_needle_tree, make_tree, sequence_probs, tilted_distribution, total_variation


def test_soft_q_from_distribution_by_hand():
    # Z = {0 w.p. .5, 1 w.p. .5}, beta = 1: log(.5 + .5 e) = log(1.85914) = .62011
    atoms = torch.tensor([0.0, 1.0], dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert abs(soft_q_from_atoms(atoms, half, beta=1.0).item() - 0.620115) < 1e-6
    assert abs(soft_q_bernoulli(torch.tensor(0.5, dtype=torch.float64), beta=1.0).item() - 0.620115) < 1e-6
    # beta -> 0 tends to the max atom (1), beta -> inf to the mean (.5)
    assert abs(soft_q_from_atoms(atoms, half, beta=0.01).item() - (1 + 0.01 * math.log(0.5))) < 1e-9
    assert abs(soft_q_from_atoms(atoms, half, beta=1e4).item() - 0.5) < 1e-4


def test_tabular_z_with_all_continuations_is_exact_q_star():
    """Feeding every (s, a, y) continuation weighted by pi_ref reproduces Q* — here with the exact
    distribution written as repeated samples on a tree with rational pi_ref (uniform) and r in {0, 1}."""
    tree = make_tree()
    tree.ref_logits = torch.zeros_like(tree.ref_logits)  # uniform pi_ref: each continuation equally likely
    tree.rewards = (tree.rewards > 0.5).to(torch.float64)
    beta = 0.3
    z = TabularZ(tree.n_states, tree.vocab, beta, prior=0.0)
    enum = tree.enumerate()
    for t in range(tree.depth):  # every path contributes (s_t, a_t, r) once: the exact law under uniform pi_ref
        z.add(enum.states[:, t], enum.tokens[:, t], enum.rewards)
    assert torch.allclose(z.q_table(), tree.soft_q(beta), atol=1e-12)


def _tv(tree, beta, n, rounds, seeds):
    target = tilted_distribution(tree, beta)
    return statistics.mean(
        total_variation(sequence_probs(tree, qsharp_exact(tree, beta=beta, samples_per_round=n // rounds,
                                                          rounds=rounds, seed=s)[0]), target).item()
        for s in range(seeds))


def test_qsharp_tv_falls_with_data_and_aggregation_beats_one_round():
    # numbers of docs/qsharp.md (8 seeds there): single round 200 -> .95, 3200 -> .40; 4 aggregated rounds .19
    tree, beta = make_needle_tree(), 0.1
    small, large = _tv(tree, beta, 200, 1, 4), _tv(tree, beta, 3200, 1, 4)
    assert large < 0.6 * small
    assert _tv(tree, beta, 3200, 4, 4) < 0.75 * large
