"""The exact harness: enumeration, closed-form optima, exact expectations and solve."""
import math

import pytest
import torch

from tilt.exact import (
    Bandit,
    TokenTree,
    exact_expectation,
    exact_gradient,
    expected_loss,
    make_bandit,
    make_tree,
    maximize_objective,
    optimal_policy,
    policy_input,
    sequence_probs,
    solve,
    tilted_distribution,
    total_variation,
)

D = torch.float64


def _reinforce(inp):
    """Plain REINFORCE surrogate -A log pi (weights pi_old detached by the harness)."""
    return -inp.advantages * inp.logp


def test_bandit_enumeration_is_prompt_major():
    b = make_bandit(n_prompts=2, n_answers=3)
    e = b.enumerate()
    # N = 2 * 3 = 6 completions: (x, a) = (0,0),(0,1),(0,2),(1,0),(1,1),(1,2)
    assert e.states[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert e.tokens[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    assert e.prompt_prob.tolist() == [0.5] * 6
    assert torch.equal(e.rewards, b.rewards.reshape(-1))


def test_tree_enumeration_and_state_index():
    t = make_tree(depth=2, vocab=3)
    e = t.enumerate()
    # path number 5 = (1, 2) in base 3; state at t=0 is the root 0, at t=1 the prefix (1,)
    # whose index is offset(1) + 1 = 1 + 1 = 2
    assert e.tokens[5].tolist() == [1, 2]
    assert e.states[5].tolist() == [0, 2]
    assert t.state_index(()) == 0 and t.state_index((1,)) == 2
    t3 = make_tree(depth=3, vocab=2)
    # prefix (1, 0): offset(2) = 1 + 2 = 3, number = 1*2 + 0 = 2 -> 5
    assert t3.state_index((1, 0)) == 5
    assert t3.enumerate().states[5].tolist() == [0, 2, 5]  # path (1,0,1) = 5
    assert t3.enumerate().rewards[5] == t3.rewards[1, 0, 1]


def test_tree_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="rewards must be"):
        TokenTree(depth=2, vocab=3, rewards=torch.zeros(3, dtype=D), ref_logits=torch.zeros(4, 3, dtype=D))


def test_bandit_optimal_policy_hand_value():
    # uniform ref over 2 answers, r = (0, 1), beta = 1: pi* = (1, e) / (1 + e)
    # = (1/3.718282, 2.718282/3.718282) = (0.268941, 0.731059)
    b = Bandit(rewards=torch.tensor([[0.0, 1.0]], dtype=D), ref_logits=torch.zeros(1, 2, dtype=D))
    pi = optimal_policy(b, 1.0)
    assert torch.allclose(pi, torch.tensor([[0.268941, 0.731059]], dtype=D), atol=1e-6)
    # V* = beta log E_ref exp(r/beta) = log((1 + e)/2) = log(1.859141) = 0.620115
    assert math.isclose(b.soft_value(1.0).item(), 0.620115, abs_tol=1e-6)


def test_tree_soft_q_hand_value():
    # depth 2, vocab 2, uniform ref, rewards r(a0, a1) = [[0, 0], [0, ln 3]], beta = 1.
    # Q*(root, 0) = V*((0,)) = log((e^0 + e^0)/2) = 0
    # Q*(root, 1) = V*((1,)) = log((1 + 3)/2) = log 2 = 0.693147
    # V*(root) = log((e^0 + e^{log 2})/2) = log(1.5) = 0.405465
    # pi*(1|root) = 0.5 * exp(log 2 - log 1.5) = 0.5 * 4/3 = 2/3
    r = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=D)
    t = TokenTree(depth=2, vocab=2, rewards=r, ref_logits=torch.zeros(3, 2, dtype=D))
    q = t.soft_q(1.0)
    assert torch.allclose(q[0], torch.tensor([0.0, math.log(2.0)], dtype=D))
    assert math.isclose(t.soft_value(1.0).item(), math.log(1.5), rel_tol=1e-12)
    assert math.isclose(t.optimal_policy(1.0)[0, 1].item(), 2.0 / 3.0, rel_tol=1e-12)
    # pi*(1 | (1,)) = 0.5 * 3 / 2 = 3/4
    assert math.isclose(t.optimal_policy(1.0)[2, 1].item(), 0.75, rel_tol=1e-12)


@pytest.mark.parametrize("depth,vocab,beta", [(2, 3, 0.5), (3, 2, 0.2), (3, 3, 1.0)])
def test_token_level_optimum_equals_sequence_tilted_distribution(depth, vocab, beta):
    t = make_tree(depth=depth, vocab=vocab, seed=depth + vocab)
    seq = sequence_probs(t, optimal_policy(t, beta))  # [1, V^depth]
    assert torch.allclose(seq, tilted_distribution(t, beta), atol=1e-12)
    assert math.isclose(seq.sum().item(), 1.0, rel_tol=1e-12)


def test_total_variation_hand_value():
    # rows: 0.5*(|0.5-0.25| + |0.5-0.75|) = 0.25 and 0; max = 0.25
    p = torch.tensor([[0.5, 0.5], [0.1, 0.9]], dtype=D)
    q = torch.tensor([[0.25, 0.75], [0.1, 0.9]], dtype=D)
    assert total_variation(p, q).item() == pytest.approx(0.25)


def test_expected_loss_modes_hand_value():
    # two sequences, T = 2, weights (0.25, 0.75), losses [[1, 3], [2, 2]]
    # token sums (4, 4): seq-mean-token-sum = 0.25*4 + 0.75*4 = 4
    # per-token means (2, 2): token-mean = seq-mean-token-mean = 2; token-sum-norm = 4/2 = 2
    per_token = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=D)
    w = torch.tensor([0.25, 0.75], dtype=D)
    m = torch.ones(2, 2, dtype=D)
    assert expected_loss(per_token, w, m, mode="seq-mean-token-sum").item() == 4.0
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert expected_loss(per_token, w, m, mode=mode).item() == 2.0
    with pytest.raises(ValueError, match="unknown reduction"):
        expected_loss(per_token, w, m, mode="nope")


def test_policy_input_weights_and_exact_baseline():
    # 1 prompt, 2 answers, uniform policy, r = (1, 3): w = (0.5, 0.5), E[r] = 2, A = (-1, 1)
    b = Bandit(rewards=torch.tensor([[1.0, 3.0]], dtype=D), ref_logits=torch.zeros(1, 2, dtype=D))
    inp, w = policy_input(b, torch.zeros(1, 2, dtype=D))
    assert w.tolist() == [0.5, 0.5]
    assert inp.advantages[:, 0].tolist() == [-1.0, 1.0]
    inp, _ = policy_input(b, torch.zeros(1, 2, dtype=D), advantage="reward")
    assert inp.advantages[:, 0].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="unknown exact advantage"):
        policy_input(b, torch.zeros(1, 2, dtype=D), advantage="grpo")


def test_kl_in_reward_is_reward_to_go():
    # depth 2, vocab 2, ref uniform, policy table with pi(0|root) = 0.8 (logits ln 4, 0),
    # uniform elsewhere. Path (0, 0): k1 at t=0 = log(0.8/0.5) = 0.470004, at t=1 = 0.
    # beta = 0.5, r = 1: G_0 = 1 - 0.5*0.470004 = 0.764998, G_1 = 1 - 0 = 1.
    t = TokenTree(depth=2, vocab=2, rewards=torch.ones(2, 2, dtype=D), ref_logits=torch.zeros(3, 2, dtype=D))
    logits = torch.zeros(3, 2, dtype=D)
    logits[0, 0] = math.log(4.0)
    inp, _ = policy_input(t, logits, advantage="reward", kl_in_reward="k1", beta=0.5)
    assert torch.allclose(inp.advantages[0], torch.tensor([0.764998, 1.0], dtype=D), atol=1e-6)


@pytest.mark.parametrize("problem", [make_bandit(n_prompts=2, n_answers=4), make_tree(depth=2, vocab=3)])
def test_reinforce_exact_gradient_equals_objective_gradient(problem):
    """E_{pi_old}[-A grad log pi] at pi_old = pi equals -grad E_pi[r] (policy-gradient theorem)."""
    logits = torch.randn(problem.ref_logits.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    grad = exact_gradient(_reinforce, logits, problem)
    table = logits.clone().requires_grad_(True)
    seq = sequence_probs(problem, torch.softmax(table, -1))  # [X, Y]
    e = problem.enumerate()
    objective = (e.prompt_prob.reshape(seq.shape) * seq * e.rewards.reshape(seq.shape)).sum()
    (expected,) = torch.autograd.grad(-objective, table)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.isfinite(grad).all()


def test_exact_expectation_accepts_registered_names_and_tuples():
    b = make_bandit(n_prompts=2, n_answers=3)
    logits = b.ref_logits.clone()
    a = exact_expectation(_reinforce, logits, b)
    c = exact_expectation(lambda inp: (_reinforce(inp), {}), logits, b)
    assert torch.equal(a, c)
    with pytest.raises(KeyError, match="valid names"):
        exact_expectation("no_such_loss", logits, b)


@pytest.mark.parametrize("problem", [make_bandit(n_prompts=3, n_answers=5), make_tree(depth=2, vocab=3)])
def test_reinforce_with_k1_reward_reaches_tilted_optimum(problem):
    """REINFORCE with -beta*k1 per-token reward maximises E[r] - beta KL(pi||pi_ref): fixed
    point pi_ref exp(r/beta)/Z (the k1 reward-to-go is log pi/pi_ref, so the score-function
    gradient is exactly grad of the regularised objective)."""
    beta = 0.5
    probs = solve(_reinforce, problem, beta=beta, kl="k1", steps=250, lr=0.1)
    tv = total_variation(sequence_probs(problem, probs), tilted_distribution(problem, beta))
    assert tv < 0.02
    # without the KL term the same loss drifts far from pi*
    greedy = solve(_reinforce, problem, beta=beta, steps=100, lr=0.1)
    assert total_variation(sequence_probs(problem, greedy), tilted_distribution(problem, beta)) > 0.1


def test_maximize_objective_recovers_tilted_optimum():
    """Direct L-BFGS maximisation of E[r] - beta KL over the table lands on the closed form."""
    b, beta = make_bandit(n_prompts=2, n_answers=4, seed=3), 0.3
    logp_ref = torch.log_softmax(b.ref_logits, -1)

    def objective(p):
        return (p * b.rewards).sum(-1).mean() - beta * (p * (p.log() - logp_ref)).sum(-1).mean()

    p = maximize_objective(objective, b)
    assert total_variation(p, optimal_policy(b, beta)) < 1e-6


# ---------------------------------------------------------------- other closed-form targets
from tilt.exact import (  # noqa: E402
    forward_kl_optimum,
    forward_kl_tilt,
    per_state_fixed_point,
    state_visit_probs,
    tsallis_tilt,
)


def test_forward_kl_tilt_hand_value():
    # uniform p_ref over 2, v = (0, 1), beta = 1: p = 0.5/(lambda - v), 0.5/l + 0.5/(l-1) = 1
    # -> l^2 - 2l + 0.5 = 0 -> l = 1 + sqrt(.5) = 1.707107, p = (0.292893, 0.707107)
    p = forward_kl_tilt(torch.log(torch.tensor([0.5, 0.5], dtype=D)), torch.tensor([0.0, 1.0], dtype=D), 1.0)
    assert torch.allclose(p, torch.tensor([0.292893, 0.707107], dtype=D), atol=1e-6)


@pytest.mark.parametrize("which", ["forward", "tsallis_2", "tsallis_0.5"])
def test_closed_form_targets_match_direct_optimisation(which):
    """forward_kl_tilt / tsallis_tilt agree with L-BFGS maximisation of the claimed objective."""
    b, beta = make_bandit(n_prompts=2, n_answers=4, seed=3), 0.5
    lp = torch.log_softmax(b.ref_logits, -1)
    if which == "forward":
        div = lambda p: (lp.exp() * (lp - p.log())).sum(-1)  # noqa: E731
        target = forward_kl_tilt(lp, b.rewards, beta)
    else:
        q = float(which.split("_")[1])
        div = lambda p: (p * (1 - (lp.exp() / p) ** (1 - q)) / (1 - q)).sum(-1)  # noqa: E731
        target = tsallis_tilt(lp, b.rewards, beta, q=q)
    p = maximize_objective(lambda p: ((p * b.rewards).sum(-1) - beta * div(p)).mean(), b)
    assert total_variation(p, target) < 1e-6
    assert total_variation(forward_kl_optimum(b, beta), forward_kl_tilt(lp, b.rewards, beta)) < 1e-12


def test_per_state_fixed_point_and_visits_hand_values():
    # tree of test_tree_soft_q_hand_value, beta = 1, reward-only values:
    # state (1,): pi = (1/4, 3/4), Q_r(root, 1) = 0.75 ln 3 = 0.823959; state (0,): Q_r = 0
    # root: pi(1) = e^0.823959 / (1 + e^0.823959) = 0.695076 (the tilted optimum has 2/3)
    r = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=D)
    t = TokenTree(depth=2, vocab=2, rewards=r, ref_logits=torch.zeros(3, 2, dtype=D))
    p = per_state_fixed_point(t, 1.0)
    assert p[0, 1].item() == pytest.approx(0.695076, abs=1e-6)
    assert p[2, 1].item() == pytest.approx(0.75)
    # uniform policy visits: root 1, each child 0.5
    assert state_visit_probs(t, torch.full((3, 2), 0.5, dtype=D)).tolist() == [1.0, 0.5, 0.5]


def test_kl_in_reward_accepts_a_callable():
    b = make_bandit(n_prompts=2, n_answers=3)
    inp_named, _ = policy_input(b, b.ref_logits + 1.0 * torch.eye(2, 3, dtype=D), kl_in_reward="k1", beta=0.3)
    inp_fn, _ = policy_input(b, b.ref_logits + 1.0 * torch.eye(2, 3, dtype=D),
                             kl_in_reward=lambda lp, lr, **kw: lp - lr, beta=0.3)
    assert torch.equal(inp_named.advantages, inp_fn.advantages)
