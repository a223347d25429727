"""Table of docs/qsharp.md: TV(Q♯-decoded, pi*) vs data size, one round vs 4 aggregated rounds (8 seeds).

python benchmarks/qsharp_exact_table.py   (about 30 s on one core)
"""
import statistics

from tilt.decoding.qsharp import qsharp_exact
from tilt.exact import make_needle_tree, make_tree, sequence_probs, tilted_distribution, total_variation

SEEDS = 8


def row(tree, beta, n):
    cells = []
    for rounds in (1, 4):
        tvs = [total_variation(sequence_probs(tree, qsharp_exact(tree, beta=beta, samples_per_round=n // rounds,
                                                                 rounds=rounds, seed=s)[0]),
                               tilted_distribution(tree, beta)).item() for s in range(SEEDS)]
        cells.append(f"{statistics.mean(tvs):.3f} ± {statistics.stdev(tvs) / SEEDS ** 0.5:.3f}")
    return f"| {n} | {cells[0]} | {cells[1]} |"


if __name__ == "__main__":
    for name, tree in [("make_needle_tree() (depth 4, V 3, P_ref(r=1) = 0.0098)", make_needle_tree()),
                       ("make_tree() (depth 2, V 3, r ~ U[0, 1])", make_tree()),
                       ("make_tree(depth=3, vocab=3, seed=4)", make_tree(depth=3, vocab=3, seed=4))]:
        print(f"\n{name}, beta = 0.1\n\n| samples | TV, one round (roll-in pi_ref) | TV, 4 aggregated rounds |\n|---|---|---|")
        for n in (200, 800, 3200, 12800):
            print(row(tree, 0.1, n))
