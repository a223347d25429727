"""End-to-end smoke tests: every registered loss, KL estimator, advantage estimator and selector
runs for a few RL steps from a ``--set``-style config, with finite metrics and changed weights;
unmet needs fail with an error naming what is missing; resumed runs match uninterrupted ones."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tilt.advantages import ADVANTAGES
from tilt.config import ConfigError, load_config
from tilt.kl import KL_ESTIMATORS
from tilt.losses import LOSSES
from tilt.selection import SELECTORS
from tilt.tracking import TIMING_KEYS
from tilt.trainer import train

BASE = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "tasks.mix=addition:1", "tasks.eval_per_cell=1", "eval.n_samples=1", "eval.max_new_tokens=6",
        "log.tensorboard=false", "log.plot=false", "log.progress=none", "threads=1", "optim.lr=0.01",
        "checkpoint.every=100"]


def even_length(prompts, completions, **_):
    """A reward a random model hits about half the time, so groups carry signal."""
    return [float(len(c) % 2 == 0) for c in completions]


def quarter_length(prompts, completions, **_):
    """Hit about a quarter of the time: a third of the groups of 4 are all-equal (dynamic sampling drops them)."""
    return [float(len(c) % 4 == 0) for c in completions]


def shipped_names(registry) -> list[str]:
    """Names registered by tilt itself (other test files register throwaway entries)."""
    return [n for n in registry.names() if registry.entry(n).fn.__module__.startswith("tilt.")]


def run(tmp_path: Path, model_dir: Path, overrides: list[str], reward=even_length, name="run") -> tuple[Path, list[dict]]:
    """Train with BASE + overrides; return the run dir and its metrics rows."""
    out = tmp_path / name
    cfg = load_config(None, BASE + [f"model.path={model_dir}", f"run_dir={out}"] + overrides)
    train(cfg, reward_fns=[reward], echo=lambda _: None)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def assert_trained(out: Path, model_dir: Path, rows: list[dict], steps: int = 2) -> None:
    """Every RL step was logged with finite metrics, and the final weights differ from the start."""
    train_rows = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    for r in train_rows:
        bad = {k: v for k, v in r.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
        assert not bad, bad
        assert r["train/skipped"] == 0
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    assert_documented(rows)


DOCUMENTED = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()


def assert_documented(rows: list[dict]) -> None:
    """Metrics are a contract: every logged key has its formula in docs/metrics.md."""
    missing = sorted({k for r in rows for k in r if k != "step" and f"`{k}`" not in DOCUMENTED})
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"


def extra_for_loss(name: str, teacher_dir: Path) -> list[str]:
    needs = LOSSES.entry(name).meta.get("needs", ())
    return [f"teacher.path={teacher_dir}"] if "teacher_logits" in needs else []


@pytest.mark.parametrize("loss", shipped_names(LOSSES))
def test_every_loss_runs_end_to_end(loss, tmp_path, tiny_llama_dir, teacher_dir):
    out, rows = run(tmp_path, tiny_llama_dir, [f"loss.name={loss}"] + extra_for_loss(loss, teacher_dir))
    assert_trained(out, tiny_llama_dir, rows)


def test_loss_specific_state_is_supplied(tmp_path, tiny_llama_dir, teacher_dir):
    """haepo sees pi_prev (kl/prev_k3 logged), astar_po sees V* (residual logged), aer's alpha moves,
    kdrl sees the teacher (kd/reverse_kl > 0 with a different teacher)."""
    _, rows = run(tmp_path, tiny_llama_dir, ["loss.name=haepo", "loss.kwargs.prev_refresh=1"], name="haepo")
    assert all("kl/prev_k3" in r for r in rows if r["step"] > 0)
    _, rows = run(tmp_path, tiny_llama_dir, ["loss.name=astar_po", "rollout.group_size=1",
                                             "rollout.prompts_per_step=4", "loss.kwargs.v_star_samples=3"], name="astar")
    assert all(r["astar/residual_abs"] > 0 for r in rows if r["step"] > 0)
    _, rows = run(tmp_path, tiny_llama_dir, ["loss.name=aer", "loss.kwargs.tau=2.0", "loss.kwargs.controller_lr=0.01"], name="aer")
    r1, r2 = [r for r in rows if r["step"] > 0]
    h0, h1 = r1["entropy"], r2["entropy"]
    # alpha_1 = 1e-3 + 0.01 * (2 H_0 - H_0); alpha_2 = alpha_1 + 0.01 * (2 H_0 - H_1)  (aer_update, tau = 2)
    assert r1["aer/alpha"] == pytest.approx(1e-3 + 0.01 * h0, rel=1e-9)
    assert r2["aer/alpha"] == pytest.approx(r1["aer/alpha"] + 0.01 * (2 * h0 - h1), rel=1e-9)
    _, rows = run(tmp_path, tiny_llama_dir, ["loss.name=kdrl", f"teacher.path={teacher_dir}"], name="kdrl")
    assert all(r["kd/reverse_kl"] > 0 for r in rows if r["step"] > 0)


@pytest.mark.parametrize("estimator", shipped_names(KL_ESTIMATORS))
def test_every_kl_estimator_runs_end_to_end(estimator, tmp_path, tiny_llama_dir):
    out, rows = run(tmp_path, tiny_llama_dir, [f"kl.estimator={estimator}", "kl.beta=0.1"])
    assert_trained(out, tiny_llama_dir, rows)
    assert all("kl/mean" in r for r in rows if r["step"] > 0)


@pytest.mark.parametrize("estimator", ["k1", "critical"])
def test_kl_in_reward_runs_end_to_end(estimator, tmp_path, tiny_llama_dir):
    out, rows = run(tmp_path, tiny_llama_dir, [f"kl.estimator={estimator}", "kl.placement=reward",
                                               "advantage.name=reinforce_pp"])
    assert_trained(out, tiny_llama_dir, rows)


@pytest.mark.parametrize("correction", ["token_tis", "sequence_mis", "icepop"])
def test_corrections_run_end_to_end(correction, tmp_path, tiny_llama_dir):
    """A correction recomputes the learner's log-probs of the sampled tokens; here sampler and learner
    are the same float32 model, so the mismatch is rounding only and no token is dropped."""
    out, rows = run(tmp_path, tiny_llama_dir, [f"correction.name={correction}"])
    assert_trained(out, tiny_llama_dir, rows)
    steps = [r for r in rows if r["step"] > 0]
    assert steps and all(r["mismatch/k3"] < 1e-6 and r["mismatch/masked_frac"] == 0.0 for r in steps)


def extra_for_advantage(name: str) -> list[str]:
    if name == "pure":  # the random model writes no correct step: add the outcome term so weights move
        return ["tasks.mix=addition_steps:1", "advantage.kwargs.outcome_coef=1.0"]
    if name == "spo_chain":
        return ["advantage.kwargs.continuations=2"]
    return []


@pytest.mark.parametrize("advantage", shipped_names(ADVANTAGES))
def test_every_advantage_runs_end_to_end(advantage, tmp_path, tiny_llama_dir):
    out, rows = run(tmp_path, tiny_llama_dir, [f"advantage.name={advantage}"] + extra_for_advantage(advantage))
    assert_trained(out, tiny_llama_dir, rows)


def test_gae_trains_and_checkpoints_the_value_head(tmp_path, tiny_llama_dir):
    out, rows = run(tmp_path, tiny_llama_dir, ["advantage.name=gae", "train.steps=3", "checkpoint.every=1"])
    assert all("value/loss" in r and "gae/returns_mean" in r for r in rows if r["step"] > 0)
    s2 = load_file(str(out / "checkpoints" / "step_0000002" / "model.safetensors"))
    s3 = load_file(str(out / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert "value_head.proj.weight" in s3 and "policy.lm_head.weight" in s3
    assert not torch.equal(s2["value_head.proj.weight"], s3["value_head.proj.weight"])  # the head learns


@pytest.mark.parametrize("selector", shipped_names(SELECTORS))
def test_every_selector_runs_end_to_end(selector, tmp_path, tiny_llama_dir):
    out, rows = run(tmp_path, tiny_llama_dir, [f"selection.name={selector}"])
    assert_trained(out, tiny_llama_dir, rows)
    key = {"dynamic_sampling": "select/groups_dropped", "d3s": "select/tokens_kept", "pf_ppo": "select/samples_kept"}
    assert all(key[selector] in r for r in rows if r["step"] > 0)


def test_pf_ppo_and_d3s_keep_what_they_say(tmp_path, tiny_llama_dir):
    """best_of_n keeps 1 of G=4 rollouts; d3s at step 1 keeps max(2, 0.5 * 4) = 2 rollouts per group."""
    _, rows = run(tmp_path, tiny_llama_dir, ["selection.name=pf_ppo", "selection.kwargs.strategy=best_of_n"], name="pf")
    assert all(r["select/samples_kept"] == 0.25 for r in rows if r["step"] > 0)  # 1 / 4
    _, rows = run(tmp_path, tiny_llama_dir, ["selection.name=d3s", "train.steps=2"], name="d3s")
    first = [r for r in rows if r["step"] == 1][0]
    assert first["select/samples_kept"] == 0.5  # 2 of 4 per group
    assert 0 < first["select/tokens_kept"] <= 0.5  # about half the kept rollouts' tokens, of all tokens


@pytest.mark.parametrize("loss", [n for n in shipped_names(LOSSES) if "teacher_logits" in LOSSES.entry(n).meta["needs"]])
def test_distillation_without_teacher_names_teacher_path(loss, tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="teacher.path"):
        run(tmp_path, tiny_llama_dir, [f"loss.name={loss}"])


def test_unmet_needs_fail_clearly(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="no step-wise task"):
        run(tmp_path, tiny_llama_dir, ["advantage.name=pure"], name="pure")
    with pytest.raises(ConfigError, match="kl.placement='loss'"):
        run(tmp_path, tiny_llama_dir, ["kl.estimator=full", "kl.placement=reward"], name="full")
    with pytest.raises(ConfigError, match="unknown keyword 'strategyy'.*allowed: strategy"):
        run(tmp_path, tiny_llama_dir, ["selection.name=pf_ppo", "selection.kwargs.strategyy=best_of_n"], name="pf")
    with pytest.raises(ConfigError, match="oversample >= 1.*got 0.5"):
        run(tmp_path, tiny_llama_dir, ["selection.name=dynamic_sampling", "selection.kwargs.oversample=0.5"],
            name="ds1")
    with pytest.raises(ConfigError, match="selection.kwargs.oversample: 'dynamic_sampling' expects float, got 'abc'"):
        run(tmp_path, tiny_llama_dir, ["selection.name=dynamic_sampling", "selection.kwargs.oversample=abc"],
            name="ds2")
    with pytest.raises(ConfigError, match="selection.kwargs.max_draws: 'dynamic_sampling' expects int, got 1.5"):
        run(tmp_path, tiny_llama_dir, ["selection.name=dynamic_sampling", "selection.kwargs.max_draws=1.5"],
            name="ds3")
    with pytest.raises(ConfigError, match="valid names: d3s, dynamic_sampling, pf_ppo"):
        load_config(None, ["selection.name=bogus"])


def resumed_equals_uninterrupted(tmp_path: Path, model_dir: Path, overrides: list[str], *, ckpt: int,
                                 reward=even_length) -> Path:
    """Run 4 steps; copy the run as if killed right after checkpoint ``ckpt``; resume; same metrics."""
    full, rows = run(tmp_path, model_dir, overrides + ["train.steps=4", f"checkpoint.every={ckpt}",
                                                       "checkpoint.keep=3"], reward=reward, name="full")
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in (cut / "checkpoints").glob("step_*"):
        if d.name != f"step_{ckpt:07d}":
            shutil.rmtree(d)
    (cut / "checkpoints" / "latest").write_text(f"step_{ckpt:07d}")
    shutil.rmtree(cut / "final")
    (cut / "summary.json").unlink()
    train(load_config(None, []), resume=cut, reward_fns=[reward], echo=lambda _: None)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    resumed = [json.loads(ln) for ln in (cut / "metrics.jsonl").read_text().splitlines()]
    assert strip(resumed) == strip(rows)
    return full


def test_resume_with_dynamic_sampling_matches_uninterrupted(tmp_path, tiny_llama_dir):
    full = resumed_equals_uninterrupted(tmp_path, tiny_llama_dir, ["selection.name=dynamic_sampling"], ckpt=2,
                                        reward=quarter_length)
    state = json.loads((full / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["data_pos"] > 2 * 2  # extra prompts were drawn before the checkpoint, and resume honoured them


def test_resume_with_haepo_matches_uninterrupted(tmp_path, tiny_llama_dir):
    """pi_prev refreshed at steps 1 and 3; resuming at step 4 needs step 3's pi_prev from the checkpoint."""
    resumed_equals_uninterrupted(tmp_path, tiny_llama_dir, ["loss.name=haepo", "loss.kwargs.prev_refresh=2"], ckpt=3)


def test_resume_with_aer_and_gae_matches_uninterrupted(tmp_path, tiny_llama_dir):
    """AER's coefficient (trainer state) and the value head (checkpoint) survive a resume."""
    resumed_equals_uninterrupted(tmp_path, tiny_llama_dir, ["loss.name=aer", "loss.kwargs.tau=2.0",
                                                            "loss.kwargs.controller_lr=0.01", "advantage.name=gae"], ckpt=2)
