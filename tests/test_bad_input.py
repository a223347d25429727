"""Bad input gets a clear error and loses nothing: config, model path, rewards, non-finite losses."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tilt.config import load_config
from tilt.learner import NonFiniteLoss
from tilt.losses import LOSSES
from tilt.trainer import train

_CALLS = {"n": 0}


@LOSSES.register("test_nan_from_third_call", reduction="token-mean", needs=())
def _nan_loss(inp, *, start: int = 3):
    """Test-only: a ppo-free surrogate that turns NaN from its ``start``-th call on."""
    _CALLS["n"] += 1
    per_token = -inp.advantages * inp.logp  # [N, T]
    if _CALLS["n"] >= start:
        per_token = per_token * math.nan
    return per_token, {}


def _cfg(model_dir, run_dir, *extra):
    return load_config(None, [f"model.path={model_dir}", f"run_dir={run_dir}", "train.steps=4",
                              "rollout.prompts_per_step=2", "rollout.group_size=4", "tasks.eval_per_cell=1",
                              "tasks.mix=addition:1", "log.tensorboard=false", "log.progress=none",
                              "train.minibatches=1", *extra])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tilt.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_config_names_field_value_and_allowed():
    out = _cli("train", "--set", "optim.lrr=0.1")
    assert out.returncode == 2
    assert "optim.lrr" in out.stderr and "0.1" in out.stderr and "lr, weight_decay" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_missing_model_path(tmp_path):
    out = _cli("train", "--set", f"model.path={tmp_path / 'missing'}", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_unknown_loss_kwarg_lists_allowed(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown keyword 'eps'.*allowed: eps_low, eps_high"):
        train(_cfg(tiny_llama_dir, tmp_path / "r", "loss.kwargs={eps: 0.3}"), echo=lambda s: None)


def test_raising_and_nan_rewards_score_zero_and_run_goes_on(tiny_llama_dir, tmp_path):
    def flaky(prompts, completions, **_):
        if len(completions) > 1:
            raise RuntimeError("batch mode unsupported")  # forces per-sample scoring
        return [math.nan if completions[0].startswith("1") else 0.5]

    msgs: list[str] = []
    summary = train(_cfg(tiny_llama_dir, tmp_path / "r"), reward_fns=[flaky], echo=msgs.append)
    assert summary["complete"]
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 4
    assert all(r["reward/errors"] == 0 for r in steps)  # per-sample retries succeeded
    assert all(0 <= r["reward/mean"] <= 0.5 for r in steps)
    assert any("batch mode unsupported" in m for m in msgs)


def test_reward_that_always_raises_is_counted(tiny_llama_dir, tmp_path):
    def broken(prompts, completions, **_):
        raise ValueError("no reward today")

    train(_cfg(tiny_llama_dir, tmp_path / "r"), reward_fns=[broken], echo=lambda s: None)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert all(r["reward/errors"] == 8 and r["reward/mean"] == 0 for r in steps)  # 2 prompts x 4 samples


def test_three_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(tiny_llama_dir, tmp_path):
    """Step 1 is fine and checkpointed; steps 2, 3, 4 are NaN: skipped, then the 3rd stops the run."""
    _CALLS["n"] = 0
    run = tmp_path / "r"
    msgs: list[str] = []
    cfg = _cfg(tiny_llama_dir, run, "loss.name=test_nan_from_third_call", "checkpoint.every=1", "kl.beta=0")
    # call 1 = step 1 (finite); calls 2.. would be NaN with start=2
    cfg.loss.kwargs = {"start": 2}
    with pytest.raises(NonFiniteLoss) as exc:
        train(cfg, echo=msgs.append)
    text = str(exc.value)
    assert "stopping at step 4" in text and "3 consecutive" in text and "step_0000003 is intact" in text
    assert sum("skipped 1 optimizer step" in m for m in msgs) == 2  # steps 2 and 3 were logged as skipped
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_0000003"  # steps 2-3 checkpoints hold the step-1 weights (nothing applied)
    from safetensors.torch import load_file

    w1 = load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w1.values())
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/skipped") for r in rows if "train/skipped" in r] == [0.0, 1.0, 1.0]
