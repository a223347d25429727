"""E1 InfAlign (arXiv:2412.19792) in training: the ``infalign`` advantage estimator (calibrate against
pi_ref's rewards, transform, then a base estimator) and the ``ref_rewards`` provider.

(a) hand values of the transformed reward the loss sees, estimator-level and through ``rollout_step``
    with a stubbed reference set; (b) ``tilt train`` end to end logging ``reward/calibrated_mean``;
(c) on an exact bandit, the paper's claim: for plain sampling the calibrated reward itself (identity
    transform) maximises the win rate against pi_ref at a KL budget, while for best-of-n the
    exponential transform exp(tC), t tuned for n, beats it, with a best t that grows with n.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import tilt.providers.rollouts as rollouts
from tilt.advantages import ADVANTAGES
from tilt.batch import AdvantageInput
from tilt.cli import app
from tilt.config import ConfigError, load_config
from tilt.exact import Bandit, best_of_n_probs, win_rate
from tilt.exact.decoders import kl
from tilt.trainer import build, rollout_step
from tilt.wiring.sampling import TrainStream

INFALIGN = ADVANTAGES.get("infalign")


def _ref(ref: list[float], G: int) -> torch.Tensor:
    """The provider's layout: one prompt's M reference rewards repeated over its G rows, [1, G, M]."""
    return torch.tensor(ref)[None, None, :].expand(1, G, len(ref))


# ----------------------------------------------------------------------------- (a) hand values

def test_bon_transform_fed_to_the_base_estimator_by_hand():
    # rewards r = [0, 1, 2, 3], reference rewards [0, 1, 1, 5] (M = 4):
    #   C(0) = 0/4 + 0.5 * 1/4 = 0.125; C(1) = 1/4 + 0.5 * 2/4 = 0.5; C(2) = C(3) = 3/4 = 0.75
    # t = 2: Φ = exp(2C) = [e^0.25, e^1, e^1.5, e^1.5]; dr_grpo: A = Φ - mean Φ
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, 3, dtype=torch.float64)
    adv, metrics = INFALIGN(AdvantageInput(rewards=r, mask=mask), ref_rewards=_ref([0.0, 1.0, 1.0, 5.0], 4),
                            base="dr_grpo", t=2.0)
    phi = torch.tensor([math.exp(0.25), math.e, math.exp(1.5), math.exp(1.5)], dtype=torch.float64)
    torch.testing.assert_close(adv[0, :, 1], phi - phi.mean())
    assert float(metrics["reward/calibrated_mean"]) == pytest.approx((0.125 + 0.5 + 0.75 + 0.75) / 4)
    assert float(metrics["reward/transformed_mean"]) == pytest.approx(float(phi.mean()))


def test_worst_of_n_and_identity_transforms_by_hand():
    # r = [1, 2], reference [1, 2]: C = [0 + 0.5 * 1/2, 1/2 + 0.5 * 1/2] = [0.25, 0.75]
    r, mask = torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, 1)
    ref = _ref([1.0, 2.0], 2)
    adv, _ = INFALIGN(AdvantageInput(rewards=r, mask=mask), ref_rewards=ref, base="dr_grpo", transform="won", t=3.0)
    won = torch.tensor([-math.exp(-0.75), -math.exp(-2.25)])  # -exp(-3C)
    torch.testing.assert_close(adv[0, :, 0], won - won.mean())
    adv, _ = INFALIGN(AdvantageInput(rewards=r, mask=mask), ref_rewards=ref, base="dr_grpo", transform="identity")
    torch.testing.assert_close(adv[0, :, 0], torch.tensor([-0.25, 0.25]))


def test_kl_in_reward_is_added_after_the_transform_not_calibrated():
    # r = [0, 1], reference [0.5]: C = [0, 1]; identity transform; token rewards (-beta kl_t) sum to [-0.3, -0.1]
    r, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    tok = torch.tensor([[[-0.1, -0.2, -9.0], [-0.1, -9.0, -9.0]]])  # -9 off the mask: ignored
    inp = AdvantageInput(rewards=r, mask=mask, token_rewards=tok)
    # dr_grpo does not read token rewards: s = Φ(C) + sum_t tok = [0 - 0.3, 1 - 0.1]; A = s - mean s = [-0.6, 0.6]
    adv, _ = INFALIGN(inp, ref_rewards=_ref([0.5], 2), base="dr_grpo", transform="identity")
    torch.testing.assert_close(adv[0, :, 0], torch.tensor([-0.6, 0.6]))
    assert torch.all(adv[mask == 0] == 0)
    # a base that adds token rewards itself gets them untouched: equal to calling it on Φ(C) directly
    adv_pp, _ = INFALIGN(inp, ref_rewards=_ref([0.5], 2), base="reinforce_pp_baseline", transform="identity")
    direct, _ = ADVANTAGES.get("reinforce_pp_baseline")(AdvantageInput(rewards=torch.tensor([[0.0, 1.0]]), mask=mask,
                                                                        token_rewards=tok))
    torch.testing.assert_close(adv_pp, direct)


def test_bad_settings_name_the_cause(tiny_llama_dir):
    with pytest.raises(ValueError, match="ref_rewards"):
        INFALIGN(AdvantageInput(rewards=torch.zeros(1, 2), mask=torch.ones(1, 2, 1)))
    for kwargs, msg in [("{base: spo_chain}", "mc_values"), ("{transform: max}", "bon, won, identity"),
                        ("{t: 0}", "t must be > 0"), ("{base: infalign}", "itself"),
                        ("{ref_samples: 0}", "ref_samples"), ("{base_kwargs: {epsilon: 0.1}}", "allowed: scale_rewards, eps"),
                        ("{base: rloo, base_kwargs: {gama: 1.0}}", "allowed: none")]:
        cfg = load_config(None, [f"model.path={tiny_llama_dir}", "advantage.name=infalign",
                                 f"advantage.kwargs={kwargs}", "threads=1"])
        with pytest.raises(ConfigError, match=msg):
            build(cfg, reward_fns=[lambda prompts, completions, **_: [0.0] * len(completions)])


def test_rollout_step_hands_the_loss_exp_tC_of_a_stubbed_reference_set(tiny_llama_dir, monkeypatch):
    # reference rewards [0, 1, 1, 2] for every prompt (stub); reward = (sum of the completion's char codes) % 3 in {0, 1, 2}:
    #   C(0) = 0.5 * 1/4 = 0.125; C(1) = 1/4 + 0.5 * 2/4 = 0.5; C(2) = 3/4 + 0.5 * 1/4 = 0.875
    # t = 2, base dr_grpo: advantage = exp(2 C(r)) - mean over the prompt's G completions
    calls = []

    def stub(ref_model, policy, sc, *, samples, **_):
        calls.append((ref_model is not None, samples))
        return torch.tensor([[0.0, 1.0, 1.0, 2.0]]).expand(len(sc.items), 4)

    monkeypatch.setattr(rollouts, "reference_rewards", stub)
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", "rollout.prompts_per_step=2", "rollout.group_size=4",
                             "rollout.max_new_tokens=6", "tasks.mix=addition:1", "threads=1", "kl.beta=0",
                             "advantage.name=infalign", "advantage.kwargs={base: dr_grpo, t: 2.0, ref_samples: 4}"])
    parts = build(cfg, reward_fns=[lambda prompts, completions, **_: [float(sum(map(ord, c)) % 3) for c in completions]])
    batch, metrics, _ = rollout_step(parts, cfg, TrainStream(cfg.tasks.mix, offset=0), 1)
    assert calls == [(True, 4)]  # pi_ref (the frozen reference model) and M = ref_samples
    c = torch.tensor([0.125, 0.5, 0.875])[batch.rewards.long()]  # [N] C of each raw reward
    phi = torch.exp(2.0 * c).view(2, 4)  # [B, G]
    want = (phi - phi.mean(1, keepdim=True)).reshape(8, 1) * batch.completion_mask  # [N, T]
    torch.testing.assert_close(batch.advantages, want.float())
    assert metrics["reward/calibrated_mean"] == pytest.approx(float(c.mean()))
    assert len(set(batch.rewards.tolist())) > 1  # the check saw more than one reward level


# ----------------------------------------------------------------------------- (b) end to end

def test_tilt_train_with_infalign_logs_the_calibrated_reward(tmp_path, tiny_llama_dir):
    (tmp_path / "rw.py").write_text("def mod3(prompts, completions, **_):\n"
                                    "    return [float(sum(map(ord, c)) % 3) for c in completions]\n")
    out = CliRunner().invoke(app, [
        "train", "--run-dir", str(tmp_path / "run"), "--reward", f"{tmp_path / 'rw.py'}:mod3",
        "--set", f"model.path={tiny_llama_dir}", "--set", "train.steps=2", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.group_size=4", "--set", "rollout.max_new_tokens=6", "--set", "tasks.mix=addition:1",
        "--set", "tasks.eval_per_cell=1", "--set", "eval.n_samples=1", "--set", "eval.max_new_tokens=4",
        "--set", "log.tensorboard=false", "--set", "log.plot=false", "--set", "log.progress=none",
        "--set", "threads=1", "--set", "advantage.name=infalign",
        "--set", "advantage.kwargs={t: 4.0, ref_samples: 3, base: rloo}"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0 and "reward/calibrated_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # C in [0, 1] with M = 3 reference samples: a multiple of 1/6; Φ = exp(4C) in [1, e^4]
        assert 0.0 <= r["reward/calibrated_mean"] <= 1.0
        assert 1.0 <= r["reward/transformed_mean"] <= math.exp(4.0)


# ----------------------------------------------------------------------------- (c) exact bandit

def _matched(ref: torch.Tensor, score: torch.Tensor, kl_budget: float) -> torch.Tensor:
    """pi ∝ pi_ref exp(score / beta) with beta set by bisection so KL(pi || pi_ref) = kl_budget, [K]."""
    span = float(score.max() - score.min())
    lo, hi = 1e-6 * span, 1e6 * span
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        pi = Bandit(rewards=score[None], ref_logits=ref.log()[None]).optimal_policy(mid)[0]
        lo, hi = (mid, hi) if float(kl(pi, ref)) > kl_budget else (lo, mid)
    assert float(kl(pi, ref)) == pytest.approx(kl_budget, rel=1e-6)
    return pi


def test_calibrated_reward_and_best_of_n_by_hand():
    # 3 answers, uniform pi_ref, rewards 0 < 1 < 2: C = [0 + 0.5/3, 1/3 + 0.5/3, 2/3 + 0.5/3] = [1/6, 1/2, 5/6]
    ref, r = torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(win_rate(torch.eye(3, dtype=torch.float64), ref, r),
                               torch.tensor([1 / 6, 1 / 2, 5 / 6], dtype=torch.float64))
    # BoN(pi_ref), n = 2: F^2 differences (1/3)^2, (2/3)^2 - (1/3)^2, 1 - (2/3)^2 = [1/9, 3/9, 5/9]
    bon = best_of_n_probs(ref, r, 2)
    torch.testing.assert_close(bon, torch.tensor([1 / 9, 3 / 9, 5 / 9], dtype=torch.float64))
    # win rate of BoN(pi_ref) vs pi_ref = E_bon[C] = 1/9 * 1/6 + 3/9 * 1/2 + 5/9 * 5/6 = (1 + 9 + 25) / 54 = 35/54
    assert float(win_rate(bon, ref, r)) == pytest.approx(35 / 54)
    assert float(win_rate(bon, bon, r)) == pytest.approx(0.5)  # symmetric: a policy ties itself


def test_infalign_transform_changes_the_best_of_n_optimum_as_the_paper_predicts():
    """K = 20 answers, uniform pi_ref, distinct rewards: C = (i + 1/2) / K (the paper's uniform calibrated space).
    Win rate of BoN_n(pi) against BoN_n(pi_ref) at a KL budget, pi ∝ pi_ref exp(Φ(C)/beta):
    n = 1: win rate = E_pi[C] is linear, so Φ = identity is the exact Lagrangian optimum and beats every exp(tC);
    n >= 2: exp(tC), t chosen on this problem as the paper does, beats identity, and the best t grows with n.
    Measured (kl 0.1): n=1 identity 0.628 vs best exp 0.627; n=2 0.645 -> 0.658 (t=4); n=4 0.654 -> 0.699 (t=8);
    n=8 0.652 -> 0.729 (t=16)."""
    K = 20
    ref = torch.full((K,), 1 / K, dtype=torch.float64)
    r = torch.arange(K, dtype=torch.float64)
    c = win_rate(torch.eye(K, dtype=torch.float64), ref, r)  # [K] calibrated reward under pi_ref
    torch.testing.assert_close(c, (r + 0.5) / K)
    ts = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    for budget in (0.1, 0.5):
        best_t = []
        for n in (1, 2, 4, 8):
            target = best_of_n_probs(ref, r, n)  # BoN_n(pi_ref)

            def bon_win(score):
                return float(win_rate(best_of_n_probs(_matched(ref, score, budget), r, n), target, r))

            identity = bon_win(c)
            exp_wins = [bon_win(torch.exp(t * c)) for t in ts]
            if n == 1:
                assert identity > max(exp_wins) + 1e-4, (budget, identity, exp_wins)
            else:
                assert max(exp_wins) > identity + 0.005, (budget, n, identity, exp_wins)
                best_t.append(ts[exp_wins.index(max(exp_wins))])
        assert best_t == sorted(best_t) and best_t[-1] > best_t[0], (budget, best_t)
