"""E3 Transfer Q*'s indirect transfer (arXiv:2405.20495 Sec. 3.2): Q for a target reward r from a
baseline rho_BL aligned to a DIFFERENT reward r_BL, reweighted by its implicit reward. Checked against
pi* ∝ pi_ref exp(r/beta) on exact trees; direct transfer with the same baseline misses it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tilt.decoding import DECODERS
from tilt.decoding.value_model import QHead
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


# ----------------------------------------------------------------------------- LM: tilt train-value --indirect

def _rollout_batch(prompt: list[int], completion: list[int]):
    from tilt.batch import RolloutBatch

    t = torch.tensor
    return RolloutBatch(t([prompt]), torch.ones(1, len(prompt), dtype=torch.long), t([completion]),
                        torch.ones(1, len(completion), dtype=torch.long), torch.zeros(1, len(completion)))


def test_indirect_log_weights_on_a_causal_lm(tiny_llama_dir, teacher_dir):
    """log w = r / beta + log pi_ref(tau) - log rho_BL(tau), tau = the roll-out after its first token a_h."""
    from tilt.decoding.train_value import indirect_log_weights
    from tilt.model import load_policy

    ref, bl = load_policy(str(tiny_llama_dir)).model, load_policy(str(teacher_dir)).model
    r = torch.tensor([1.0])
    # rho_BL = pi_ref: the ratio is 1, log w = r / beta = 1 / 0.5 = 2
    out = _rollout_batch([5, 6, 7], [8, 9, 10])
    assert torch.allclose(indirect_log_weights(ref, ref, out, r, beta=0.5), torch.tensor([2.0]))
    # a roll-out of a_h alone has no continuation: log w = r / beta whatever the baseline
    assert torch.allclose(indirect_log_weights(ref, bl, _rollout_batch([5, 6, 7], [8]), r, beta=0.5),
                          torch.tensor([2.0]))
    # two continuation tokens (9, 10) after a_h = 8: the log-probs from each model's plain forward pass
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        def logp(model):  # log p(9 | 5 6 7 8) + log p(10 | 5 6 7 8 9)
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)  # [6, V]
            return lp[3, 9] + lp[4, 10]
        want = 2.0 + logp(ref) - logp(bl)
    assert torch.allclose(indirect_log_weights(ref, bl, out, r, beta=0.5), want[None], atol=1e-5)


def test_weighted_value_fit_learns_the_reweighted_expectation():
    """One (s, a) seen twice with rewards 1 and 0 and weights 3 : 1: the weighted BCE's minimiser is
    P(r = 1) = (3 * 1 + 1 * 0) / 4 = 0.75; at logit 0 the weighted BCE is log 2."""
    from tilt.decoding.train_value import ValueData, _bce, fit_head

    data = ValueData(torch.ones(2, 1), torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 0.0]),
                     torch.tensor([math.log(3.0), 0.0]))
    head = QHead(1, 2)
    assert _bce(head, data, torch.arange(2)).item() == pytest.approx(math.log(2.0))
    fit_head(head, data, epochs=150, lr=0.05)
    assert torch.sigmoid(head(torch.ones(1, 1))[0, 0]).item() == pytest.approx(0.75, abs=1e-3)
    with pytest.raises(ValueError, match="weighted"):
        data.extend(ValueData(torch.ones(1, 1), torch.zeros(1, dtype=torch.long), torch.ones(1)))


def test_cli_train_value_indirect_transfer(tiny_llama_dir, teacher_dir, tmp_path):
    from typer.testing import CliRunner

    from tilt.cli import app

    runner = CliRunner()
    common = ["train-value", str(tiny_llama_dir), "--tasks", "addition:1", "--rounds", "2", "--prompts", "4",
              "--epochs", "2", "--max-new-tokens", "4"]
    res = runner.invoke(app, common + ["--rollout-model", str(teacher_dir), "--indirect", "--out", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "v" / "q_head.json").read_text())
    assert meta["indirect"] is True and meta["rollout_model"] == str(teacher_dir) and len(meta["rounds"]) == 2
    bad = runner.invoke(app, common + ["--indirect", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--rollout-model" in bad.output
