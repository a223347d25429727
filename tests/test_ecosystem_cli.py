"""From the CLI: a reasoning-gym task with its score_answer reward, and a code task with code_exec."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tilt.verifiers.sandbox import check_sandbox

ROOT = Path(__file__).parents[1]


def _train(run: Path, *sets: str) -> list[dict]:
    common = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4", "tasks.eval_per_cell=2",
              "log.tensorboard=false", "log.progress=none", "threads=1", "checkpoint.every=1000"]
    cmd = [sys.executable, "-m", "tilt.cli", "train", "--run-dir", str(run)]
    for s in (*common, *sets):
        cmd += ["--set", s]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_run_on_reasoning_gym_chain_sum(tmp_path):
    rows = _train(tmp_path / "rg", "tasks.mix=rg_chain_sum:1", "reward.functions=[reasoning_gym]")
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2 and all(r["reward/errors"] == 0 and r["reward/timeouts"] == 0 for r in steps)
    seeds = json.loads((tmp_path / "rg" / "seeds.json").read_text())  # which seeds trained / evaluated
    train, ev = seeds["train"]["rg_chain_sum"], seeds["eval"]["rg_chain_sum"]
    assert train["count"] == 4 and train["max_seed"] < ev["min_seed"]  # 2 steps x 2 prompts; disjoint ranges


@pytest.mark.slow
def test_cli_run_on_code_mul_with_code_exec(tmp_path):
    try:
        check_sandbox()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    rows = _train(tmp_path / "code", "tasks.mix=code_mul:1", "reward.functions=[code_exec]", "reward.timeout_s=120")
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2 and all(r["reward/errors"] == 0 and r["reward/timeouts"] == 0 for r in steps)
    assert sum(r["reward/mean"] for r in steps) > 0  # the base model multiplies one-digit numbers ~75% right
