"""B1 policy losses: hand-computed values (matching TRL 1.16's formulas), GSPO's token form,
and fixed points on the exact harness.

TRL references are to trl 1.16.0, trl/trainer/grpo_trainer.py ``GRPOTrainer._compute_loss``:
ratio L3082-L3095, clipped surrogate L3113-L3120, reductions "grpo" L3153-L3154, "dr_grpo"
L3163-L3164, "dapo" L3168-L3173. These tests do not import TRL.
"""
import math

import pytest
import torch

from loss_helpers import with_exact_reverse_kl
from tilt.batch import PolicyLossInput
from tilt.exact import (Bandit, make_bandit, make_tree, maximize_objective, optimal_policy, sequence_probs,
                        solve, tilted_distribution, total_variation)
from tilt.kl import k3
from tilt.losses import LOSSES
from tilt.reduction import reduce_tokens, reduction_denominator

D = torch.float64
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
# ratios pi/pi_old; the last token of row 1 is padding with a garbage ratio
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [1.25, 0.7, 9.0]], dtype=D)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 100.0]], dtype=D)


def _inp(ratios=RATIOS, adv=ADV, mask=MASK) -> PolicyLossInput:
    old = torch.full_like(ratios, math.log(0.5))  # pi_old(y_t) = 0.5 everywhere
    return PolicyLossInput(logp=(old + ratios.log()).requires_grad_(True), old_logp=old, advantages=adv, mask=mask)


def _loss(name, inp, max_len=None, **hypers):
    entry = LOSSES.entry(name)
    per_token, metrics = entry.fn(inp, **hypers)
    mode = entry.meta["reduction"]
    denom = reduction_denominator(inp.mask, mode, max_len=max_len)
    return reduce_tokens(per_token, inp.mask, mode=mode, denominator=denom), metrics


# Per-token -min(r A, clip(r, 0.8, 1.2) A):
#   row 0 (A = +1): r = 1.5 -> min(1.5, 1.2) = 1.2 -> -1.2 ; r = 0.5 -> min(0.5, 0.8) = 0.5 -> -0.5 ;
#                   r = 1.1 -> -1.1                                   row sum -2.8
#   row 1 (A = -2): r = 1.25 -> min(-2.5, -2.4) = -2.5 -> 2.5 ; r = 0.7 -> min(-1.4, -1.6) = -1.6 -> 1.6
#                                                                     row sum  4.1


def test_grpo_value_matches_trl_grpo_reduction():
    # TRL L3154: mean_i [sum_t l_it m_it / sum_t m_it] = (-2.8/3 + 4.1/2) / 2 = (-0.93333 + 2.05) / 2 = 0.558333
    loss, metrics = _loss("grpo", _inp())
    assert loss.item() == pytest.approx((-2.8 / 3 + 4.1 / 2) / 2, abs=1e-12)
    # clipping binds on row0 t0 (r > 1.2, A > 0) and row1 t1 (r < 0.8, A < 0): 2 of 5 tokens
    assert metrics["clip/frac"].item() == pytest.approx(0.4)
    # mean ratio over the 5 real tokens: (1.5 + 0.5 + 1.1 + 1.25 + 0.7) / 5 = 1.01
    assert metrics["ratio/mean"].item() == pytest.approx(1.01)


def test_dapo_value_matches_trl_dapo_reduction():
    # clip-higher 1 + 0.28: row0 t0 -> min(1.5, 1.28) = 1.28 -> -1.28; the rest as above.
    # TRL L3170-L3173 with one process, no accumulation: token sum / number of tokens
    #   = (-1.28 - 0.5 - 1.1 + 2.5 + 1.6) / 5 = 1.22 / 5 = 0.244
    loss, metrics = _loss("dapo", _inp())
    assert loss.item() == pytest.approx(0.244, abs=1e-12)
    assert metrics["clip/frac"].item() == pytest.approx(0.4)


def test_dr_grpo_value_matches_trl_dr_grpo_reduction():
    # TRL L3164: token sum / (N * max_completion_length) = (-2.8 + 4.1) / (2 * 4) = 1.3 / 8 = 0.1625
    loss, _ = _loss("dr_grpo", _inp(), max_len=4)
    assert loss.item() == pytest.approx(0.1625, abs=1e-12)


def test_ppo_clip_value_is_token_mean():
    # verl default loss_agg_mode token-mean: (-2.8 + 4.1) / 5 = 0.26
    loss, _ = _loss("ppo_clip", _inp())
    assert loss.item() == pytest.approx(0.26, abs=1e-12)


def test_reinforce_value_sums_tokens_and_ignores_ratio():
    # logp = log(0.5 r): row0 log .75, log .25, log .55 ; row1 log .625, log .35
    # -A log pi summed per sequence: row0 -(−0.287682 − 1.386294 − 0.597837) = 2.271813
    #                                row1 2 (−0.470004 − 1.049822) = −3.039652 ; mean = −0.383920
    expected = (-(math.log(0.75) + math.log(0.25) + math.log(0.55)) + 2 * (math.log(0.625) + math.log(0.35))) / 2
    loss, _ = _loss("reinforce", _inp())
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(-0.383920, abs=1e-6)
    inp = _inp()
    (grad,) = torch.autograd.grad(_loss("reinforce", inp)[0], inp.logp)
    # d/d logp_it = -A_it m_it / N: row0 -1/2, row1 +1 on real tokens, 0 on padding
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5, -0.5], [1.0, 1.0, 0.0]], dtype=D))


GSPO_RATIOS = torch.tensor([[2.0, 0.5, 1.0], [1.21, 1.0, 7.0]], dtype=D)


def test_gspo_value_uses_sequence_ratio():
    # s_0 = exp(mean(log 2, log .5, log 1)) = exp(0) = 1 ; s_1 = exp(mean(log 1.21, log 1)) = sqrt(1.21) = 1.1
    # row0 A = +1: -min(1, 1) = -1 per token -> mean -1
    # row1 A = -2: min(1.1 * -2, clip(1.1, 1 - 3e-4, 1 + 4e-4) * -2) = min(-2.2, -2.0008) = -2.2 -> 2.2
    # TRL "grpo" reduction of the (B, 1) sequence loss (L3154): (-1 + 2.2) / 2 = 0.6
    loss, metrics = _loss("gspo", _inp(ratios=GSPO_RATIOS))
    assert loss.item() == pytest.approx(0.6, abs=1e-12)
    assert metrics["clip/frac"].item() == 0.0  # row1 takes the unclipped branch (A < 0, s > 1)
    # with A = +2 on row1: min(2.2, 2.0008) = 2.0008 -> -2.0008 ; (-1 - 2.0008) / 2 = -1.5004
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=D)
    loss, metrics = _loss("gspo", _inp(ratios=GSPO_RATIOS, adv=adv))
    assert loss.item() == pytest.approx(-1.5004, abs=1e-12)
    assert metrics["clip/frac"].item() == pytest.approx(2 / 5)  # both real tokens of row1 clipped


def test_gspo_token_form_has_sequence_level_gradient():
    """GSPO-token (sg[s_i] pi_t / sg[pi_t]) has the value and the gradient of sequence-level GSPO
    (TRL importance_sampling_level="sequence", L3086-L3088) when A is constant per sequence."""
    inp = _inp(ratios=GSPO_RATIOS)
    loss, _ = _loss("gspo", inp)
    (g_tok,) = torch.autograd.grad(loss, inp.logp)
    logp = inp.logp.detach().clone().requires_grad_(True)
    log_s = ((logp - inp.old_logp) * MASK).sum(-1) / MASK.sum(-1)  # [N]
    s = log_s.exp()
    a = torch.tensor([1.0, -2.0], dtype=D)
    seq_loss = (-torch.minimum(s * a, s.clamp(1 - 3e-4, 1 + 4e-4) * a)).mean()
    (g_seq,) = torch.autograd.grad(seq_loss, logp)
    torch.testing.assert_close(loss, seq_loss)
    torch.testing.assert_close(g_tok, g_seq)


# ------------------------------------------------------------------ fixed points (exact harness)

BETA = 0.5
B1 = ["reinforce", "ppo_clip", "grpo", "dapo", "dr_grpo", "gspo"]


@pytest.mark.parametrize("name", B1)
def test_reaches_tilted_optimum_with_reverse_kl(name):
    """On-policy with the infinite-group baseline, each B1 surrogate has gradient E[A grad log pi]
    (ratio 1). Adding the exact reverse KL to pi_ref (bandit: in the loss, one step = the whole
    sequence; token tree: k1 in the reward, so the return is r - beta log pi/pi_ref) makes it the
    gradient of E[r] - beta KL(pi || pi_ref), whose maximiser is pi_ref exp(r/beta) / Z."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    mode = LOSSES.entry(name).meta["reduction"]
    p = solve(with_exact_reverse_kl(name, BETA), bandit, beta=BETA, mode=mode, steps=60, lr=0.3)
    assert total_variation(p, optimal_policy(bandit, BETA)) < 0.02
    tree = make_tree(depth=2, vocab=3, seed=0)
    p = solve(name, tree, beta=BETA, kl="k1", steps=60, lr=0.3)
    assert total_variation(sequence_probs(tree, p), tilted_distribution(tree, BETA)) < 0.02


def test_reinforce_reaches_argmax_fixed_point_without_kl():
    """Unregularised policy gradient (beta -> 0) maximises E[r]: its fixed point is the
    deterministic best answer of each prompt (rewards are distinct, so it is unique)."""
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    p = solve("reinforce", bandit, beta=0.0, steps=100, lr=0.3)
    best = torch.nn.functional.one_hot(bandit.rewards.argmax(-1), 4).to(D)
    assert total_variation(p, best) < 0.02


def test_grpo_with_k3_in_loss_reaches_forward_kl_fixed_point():
    """GRPO's k3 penalty in the loss (Eq. 3, arXiv:2402.03300) has on-policy gradient
    E[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi): the FORWARD KL (Sec. 4,
    arXiv:2505.17508). So grpo + beta k3 converges to argmax E[r] - beta KL(pi_ref || pi), which
    here is > 0.05 in TV away from the tilted optimum."""
    beta = 0.2
    base = make_bandit(n_prompts=2, n_answers=4, seed=1)
    bandit = Bandit(rewards=3.0 * base.rewards, ref_logits=base.ref_logits)

    def grpo_k3(inp):
        per_token, _ = LOSSES.get("grpo")(inp)
        return per_token + beta * k3(inp.logp, inp.ref_logp)

    p = solve(grpo_k3, bandit, beta=beta, mode="seq-mean-token-mean", steps=100, lr=0.3)
    ref = torch.softmax(bandit.ref_logits, -1)

    def forward_objective(probs):
        return ((probs * bandit.rewards).sum(-1) - beta * (ref * (ref.log() - probs.log())).sum(-1)).mean()

    target = maximize_objective(forward_objective, bandit)
    assert total_variation(p, target) < 0.02
    assert total_variation(p, optimal_policy(bandit, beta)) > 0.05
