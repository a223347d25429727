"""B11 trust-region peers (dual_clip, gmpo, clip_cov, kl_cov): hand-computed values and gradients,
GMPO equal to TRL 1.16's experimental GMPOTrainer._compute_loss, and fixed points on the exact harness."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tilt.batch import PolicyLossInput
from tilt.exact import make_bandit, optimal_policy, solve, total_variation
from tilt.kl import categorical_kl, k3
from tilt.losses import LOSSES
from tilt.reduction import reduce_tokens, reduction_denominator

D = torch.float64
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [1.25, 0.7, 9.0]], dtype=D)  # last token of row 1 is padding
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 100.0]], dtype=D)
# pi_old = 0.5, so log pi = log(0.5 r) = [-.287682, -1.386294, -.597837 | -.470004, -1.049822]
# token covariance (log pi - mean)(A - mean): means -.758328 and -0.2 ->
#   [.564775, -.753566, .192588 | -.519297, .524700]


def _run(name, **hypers):
    old = torch.full_like(RATIOS, math.log(0.5))
    inp = PolicyLossInput(logp=(old + RATIOS.log()).requires_grad_(True), old_logp=old, advantages=ADV, mask=MASK)
    entry = LOSSES.entry(name)
    per_token, metrics = entry.fn(inp, **hypers)
    mode = entry.meta["reduction"]
    value = reduce_tokens(per_token, MASK, mode=mode, denominator=reduction_denominator(MASK, mode))
    (grad,) = torch.autograd.grad(value, inp.logp)
    return value.item(), grad, metrics


def test_dual_clip_caps_negative_advantage_loss():
    # PPO per token: row 0 -1.2 -0.5 -1.1 ; row 1 (A = -2) 2.5, 1.6. With c = 1.1 the cap -cA = 2.2
    # replaces 2.5 (r = 1.25); 1.6 < 2.2 stays. token-mean (-2.8 + 2.2 + 1.6) / 5 = 0.2
    value, grad, m = _run("dual_clip", clip_c=1.1)
    assert value == pytest.approx(0.2, abs=1e-12)
    # gradient -r A / 5 where no clip binds: (0,1) -0.1, (0,2) -0.22; clipped and capped tokens 0
    expected = torch.tensor([[0.0, -0.1, -0.22], [0.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert m["clip/dual_frac"].item() == pytest.approx(1 / 5)
    assert _run("dual_clip")[0] == pytest.approx(0.26, abs=1e-12)  # c = 3: cap 6 never binds -> ppo_clip
    with pytest.raises(ValueError, match="clip_c > 1"):
        _run("dual_clip", clip_c=0.9)


def test_gmpo_geometric_mean_of_log_clipped_ratios():
    # row 0 (A > 0): log r = .405465, -.693147, .095310; clamp to [-.4, .4] then min -> .4, -.693147, .095310
    #   w0 = exp(mean) = exp(-.065946) = .936181
    # row 1 (A < 0): log r = .223144, -.356675 inside the range -> w1 = exp(-.066766) = .935414
    # seq-mean of -w A: (-.936181 + 2 x .935414) / 2 = 0.467324
    value, grad, m = _run("gmpo")
    assert value == pytest.approx(0.4673235, abs=1e-6)
    # d/dlog pi: row 0 token 0 clipped -> 0; others -w0 / 3 / 2 = -.156030 ; row 1 +2 w1 / 2 / 2 = .467707
    expected = torch.tensor([[0.0, -0.156030, -0.156030], [0.467707, 0.467707, 0.0]], dtype=D)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert m["clip/frac"].item() == pytest.approx(1 / 5)


def test_clip_cov_removes_gradient_of_a_high_covariance_token():
    # cov_low = 0: tokens with 0 < Cov < 5 not already PPO-clipped: (0,0) and (1,1) are clipped,
    # so only (0,2) (Cov .192588) is eligible; max(1, int(2e-4 x 5)) = 1 token is zeroed.
    # value: ppo_clip's 1.3 without (0,2)'s -1.1 -> 2.4 / 5 = 0.48
    value, grad, m = _run("clip_cov", cov_low=0.0)
    assert value == pytest.approx(0.48, abs=1e-12)
    assert grad[0, 2] == 0 and grad[1, 0] == pytest.approx(0.5)  # -rA / 5 = 2.5 / 5 on (1,0)
    assert m["cov/clipped_frac"].item() == pytest.approx(1 / 5)
    # with the default bounds (1, 5) no token is eligible: exactly ppo_clip
    assert _run("clip_cov")[0] == pytest.approx(_run("ppo_clip")[0], abs=1e-15)


def test_kl_cov_penalises_top_covariance_tokens():
    # ratio .5 -> k = int(.5 x 5) = 2 tokens of largest Cov: (0,0) .564775 and (1,1) .524700.
    # -r A: -1.5 -.5 -1.1 | 2.5 1.4 (sum .8) ; + |log 1.5| + |log .7| = .405465 + .356675 ; / 5 = 0.312428
    value, grad, m = _run("kl_cov", ratio=0.5)
    assert value == pytest.approx(0.3124280, abs=1e-6)
    # gradient (-r A + sign(log r) on the two) / 5: (0,0) (-1.5 + 1)/5 = -.1 ; (1,1) (1.4 - 1)/5 = .08
    expected = torch.tensor([[-0.1, -0.1, -0.22], [0.5, 0.08, 0.0]], dtype=D)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert m["cov/penalised_frac"].item() == pytest.approx(2 / 5)


def test_gmpo_equals_trl_experimental_gmpo():
    """tilt's gmpo + beta * k3 (seq-mean-token-mean) = TRL 1.16 trl/experimental/gmpo GMPOTrainer._compute_loss,
    value and gradient, off-policy with the log-space clip binding."""
    gmpo_mod = pytest.importorskip("trl.experimental.gmpo.gmpo_trainer")
    g = torch.Generator().manual_seed(0)
    n, t, v, beta = 5, 4, 6, 0.04
    mask = torch.tensor([[1] * k + [0] * (t - k) for k in (4, 2, 3, 1, 4)])
    tokens = torch.randint(0, v, (n, t), generator=g)
    logits = torch.randn(n, t, v, generator=g, dtype=D)
    logp0 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = logp0 - (1.4 * torch.rand(n, t, generator=g, dtype=D) - 0.7)  # log-ratios in [-.7, .7]: clip at .4 binds
    ref = logp0 + 0.5 * torch.randn(n, t, generator=g, dtype=D)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9], dtype=D)

    def logp_of(leaf):
        return torch.log_softmax(leaf, -1).gather(-1, tokens[..., None]).squeeze(-1)

    leaf = logits.clone().requires_grad_(True)
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, epsilon_low=0.4, epsilon_high=0.4, beta=beta, current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp_of(leaf), torch.zeros(n, t, dtype=D), None))
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": tokens, "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref}
    v_trl = gmpo_mod.GMPOTrainer._compute_loss(stub, None, inputs)
    (g_trl,) = torch.autograd.grad(v_trl, leaf)

    leaf2 = logits.clone().requires_grad_(True)
    lp, m = logp_of(leaf2), mask.to(D)
    per_token, metrics = LOSSES.get("gmpo")(PolicyLossInput(logp=lp, old_logp=old, advantages=adv[:, None].expand(n, t),
                                                            mask=m))
    value = reduce_tokens(per_token + beta * k3(lp, ref), m, mode="seq-mean-token-mean",
                          denominator=reduction_denominator(m, "seq-mean-token-mean"))
    (g_tilt,) = torch.autograd.grad(value, leaf2)
    torch.testing.assert_close(value.detach(), v_trl.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(g_tilt, g_trl, rtol=0, atol=1e-6)
    assert metrics["clip/frac"] > 0


@pytest.mark.parametrize("name", ["dual_clip", "gmpo", "kl_cov", "clip_cov"])
def test_reach_tilted_optimum_on_policy(name):
    """On-policy (ratio 1) dual-clip and PPO-clip coincide; GMPO's weight has gradient mean_t grad log pi
    (on the one-token bandit, the score function); KL-Cov's |log pi - log pi_old| has value and gradient
    0; Clip-Cov selects nothing when no token's covariance is in (1, 5), which holds here (|Cov| < 1 on
    this bandit). With the exact reverse KL each reaches pi* = pi_ref exp(r/beta) / Z.
    Clip-Cov has no fixed point of its own in general: which tokens lose their gradient depends on
    the sampled batch, so its stationary point is that of a batch-dependent, biased gradient."""
    beta = 0.5
    bandit = make_bandit(n_prompts=2, n_answers=4, seed=1)
    fn = LOSSES.get(name)

    def with_kl(inp):
        per_token, m = fn(inp)
        assert m.get("cov/clipped_frac", 0.0) == 0.0  # Clip-Cov selected no token on this bandit
        return per_token + beta * categorical_kl(inp.logits, inp.ref_logits)

    p = solve(with_kl, bandit, beta=beta, mode=LOSSES.entry(name).meta["reduction"], steps=60, lr=0.3)
    assert total_variation(p, optimal_policy(bandit, beta)) < 0.02
