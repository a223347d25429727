"""A task tilt does not ship, from files, end to end: tilt sft -> tilt train -> tilt eval -> tilt compare.

The task is reversing a digit string; the data are JSONL files and the reward is a module in
TRL's exact signature that reads the ``answer`` column by keyword. No tilt code is patched: every
step is the ``tilt`` command line in a subprocess, as a user would run it.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REWARDS = '''
def reverse_reward(prompts, completions, answer, **kwargs):
    """Share of positions right; 1.0 = exactly the reversed digits (TRL's reward signature)."""
    out = []
    for c, a in zip(completions, answer):
        c = c.strip()
        out.append(sum(x == y for x, y in zip(c, a)) / max(len(a), len(c)))
    return out
'''


def tilt(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-m", "tilt.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=900)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def write_task(d: Path) -> None:
    """300 labelled rows (prompt, completion) for SFT; 900 RL rows (prompt, answer, digits); the reward."""
    rng = random.Random(0)
    nums = rng.sample(range(100, 100000), 1200)
    rows = [{"prompt": f"reverse {n}=", "answer": str(n)[::-1], "digits": len(str(n))} for n in nums]
    (d / "sft.jsonl").write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]})
                                           for r in rows[:300]))
    (d / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows[300:]))
    (d / "rewards.py").write_text(REWARDS)


COMMON = ["--set", "threads=1", "--set", "eval.every=0", "--set", "log.plot=false", "--set", "log.tensorboard=false",
          "--set", "rollout.prompts_per_step=8", "--set", "rollout.group_size=8", "--set", "optim.lr=3e-4",
          "--set", "log.progress=plain"]


@pytest.mark.slow
def test_new_task_from_files_sft_train_eval_compare(tmp_path):
    write_task(tmp_path)
    tilt(tmp_path, "sft", "sft.jsonl", "--out", "m_sft", "--epochs", "1", "--lr", "1e-3")
    assert (tmp_path / "m_sft" / "config.json").exists()

    # RL on the new task from the SFT model; eval rows: a 10% hash-held-out fraction, capped at 48
    tilt(tmp_path, "train", "--data", "rl.jsonl", "--reward", "rewards.py:reverse_reward", "--run-dir", "run",
         "--set", "model.path=m_sft", "--set", "train.steps=20", "--set", "data.eval.max_rows=48",
         "--set", "data.eval.breakdown=digits", *COMMON)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    h = summary["heldout"]
    # measured on this setup at 30 steps: pass@1 0.44 -> 0.78; 20 steps must add at least 0.1
    assert h["pass1_after"] > h["pass1_before"] + 0.1, h
    rewards = [json.loads(x).get("reward/mean") for x in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r for r in rewards if r is not None]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5, rewards
    assert set(h["per_cell"]) <= {"digits=3", "digits=4", "digits=5"}
    seeds = json.loads((run / "seeds.json").read_text())["dataset"]
    assert seeds["eval_overlap_train"] == 0 and seeds["eval_rows"] == 48

    # tilt eval: the same held-out rows, scored with the user's reward, reproduce the run's numbers
    tilt(tmp_path, "eval", "run", "--k", "1,2", "--n", "8", "--max-new-tokens", "16")
    report = json.loads((run / "eval.json").read_text())
    assert report["reward_functions"] == ["rewards.py:reverse_reward"] and not report["contaminated"]
    rows = {r["cell"]: r for r in report["rows"]}
    for cell, vals in h["per_cell"].items():
        # same rows, same sampling seed, same reward: tilt eval's mean reward is the run's pass@1 per cell
        assert rows[cell]["mean_reward"] == pytest.approx(vals["pass1"], abs=1e-9)
        # greedy of the report counts reward >= 1 (exact reversal); the summary's is the mean reward
        assert report["per_cell"][cell]["greedy"] <= vals["greedy"] + 1e-9

    # a two-method compare on the dataset
    (tmp_path / "base.yaml").write_text(
        "model: {path: m_sft}\ndata: {train: {path: rl.jsonl}, eval: {max_rows: 16}}\n"
        "reward: {functions: ['rewards.py:reverse_reward']}\n"
        "rollout: {prompts_per_step: 4, group_size: 4}\neval: {every: 0, n_samples: 2}\nthreads: 1\n"
        "log: {plot: false, tensorboard: false, progress: plain}\n")
    (tmp_path / "spec.yaml").write_text(
        "name: reverse\nbase_config: base.yaml\nmethods:\n  grpo: {overrides: {loss.name: grpo}}\n"
        "  dr_grpo: {overrides: {loss.name: dr_grpo}}\nseeds: [0]\ntasks: [dataset]\nbaseline: grpo\n"
        "steps: 3\nworkers: 1\nmetric: pass1\n")
    tilt(tmp_path, "compare", "spec.yaml", "--out", "cmp", "--reps", "50")
    report_md = (tmp_path / "cmp" / "report.md").read_text()
    assert "grpo__dataset__seed0" in report_md and "dr_grpo__dataset__seed0" in report_md
    assert "eval overlaps train" in report_md


def cli(*args: str):
    """`tilt ...` in this process (typer's runner): the fast path of the default suite."""
    from typer.testing import CliRunner

    from tilt.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_train_and_eval_on_a_dataset_with_a_file_reward(tmp_path, tiny_llama_dir, monkeypatch):
    """The default-suite version: 2 steps from a tiny model; the user's reward scores train and eval."""
    write_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = cli("train", "--data", "rl.jsonl", "--reward", "rewards.py:reverse_reward", "--run-dir", "run",
              "--set", f"model.path={tiny_llama_dir}", "--set", "train.steps=2", "--set", "data.eval.max_rows=4",
              "--set", "eval.n_samples=2", "--set", "rollout.max_new_tokens=6", "--set", "eval.max_new_tokens=6",
              *COMMON)
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"]["eval_rows"] == 4 and list(summary["heldout"]["per_cell"]) == ["data"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/errors"] == 0 for r in rows if "reward/errors" in r)
    assert "evaluating before training: 4 held-out prompts x (1 greedy + 2 samples)" in out.output
    out = cli("eval", "run", "--n", "2", "--max-new-tokens", "6")
    assert out.exit_code == 0 and "data" in out.output, out.output
    # a model directory (no run) on a dataset file, broken down by a column, with the user's reward
    out = cli("eval", str(tiny_llama_dir), "--data", "rl.jsonl", "--reward", "rewards.py:reverse_reward", "--n", "1",
              "--per-cell", "6", "--max-new-tokens", "4", "--breakdown", "digits", "--out", "model_eval.json")
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "model_eval.json").read_text())
    assert report["dataset"]["eval_rows"] == 256 and sum(r["n_items"] for r in report["rows"][:-1]) == 6
    assert set(report["per_cell"]) <= {"digits=3", "digits=4", "digits=5"} and not report["contaminated"]
    # a reward module that does not import, and a wrong signature: clear errors, exit code 2, nothing trained
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "narrow.py").write_text("def f(prompts, completions):\n    return [0.0] * len(prompts)\n")
    bad = cli("train", "--data", "rl.jsonl", "--reward", "bad.py:f", "--run-dir", "r_bad")
    assert bad.exit_code == 2 and "could not be imported: RuntimeError: boom at import" in bad.output
    narrow = cli("train", "--data", "rl.jsonl", "--reward", "narrow.py:f", "--run-dir", "r_narrow",
                 "--set", f"model.path={tiny_llama_dir}")
    assert narrow.exit_code == 2 and "cannot be called as TRL and tilt call it" in narrow.output
    assert not (tmp_path / "r_narrow" / "checkpoints").exists()
    missing = cli("train", "--data", "nope.jsonl", "--run-dir", "r_missing")
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_no_signal_warning_after_n_all_zero_steps():
    from tilt.alerts import SignalWatch

    w = SignalWatch(3)
    zero, live = torch.zeros(4, 2), torch.tensor([[0.0, 0.5]])
    # steps: zero, zero, live (streak resets), zero, zero, zero (streak 3 -> warn once), zero (no repeat)
    out = [w.update(a, {"reward/mean": 0.0}) for a in (zero, zero, live, zero, zero, zero, zero)]
    assert [o is not None for o in out] == [False, False, False, False, False, True, False]
    assert "no learning signal for 3 steps" in out[5] and "reward is always 0 or always 1" in out[5]
    assert SignalWatch(0).update(zero, {}) is None


def test_pretrain_no_longer_overwrites_the_shipped_model_by_default():
    out = cli("pretrain")
    assert out.exit_code == 2 and "--overwrite-shipped" in out.output


def test_conversational_dataset_trains_and_rewards_see_messages(tmp_path, tiny_llama_dir):
    """A chat-template model on a messages dataset: prompts reach the reward as message lists and
    completions as [{"role": "assistant", "content": ...}], as TRL passes them."""
    import shutil

    from datasets import Dataset

    import tilt

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_llama_dir, model)
    cfg_path = model / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                                "{% if add_generation_prompt %}a: {% endif %}")
    cfg_path.write_text(json.dumps(tok_cfg))
    seen: list = []

    def reward(prompts, completions, answer, **kwargs):
        seen.append((prompts[0], completions[0], kwargs["trainer_state"].global_step))
        return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]
    reward.tilt_in_process = True  # records into this process's list (a worker process would keep its own)

    rows = [{"prompt": [{"role": "user", "content": f"rev {n}"}], "answer": str(n)[::-1]} for n in range(10, 30)]
    summary = tilt.train({"model": {"path": str(model)}, "train": {"steps": 2},
                          "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
                          "eval": {"n_samples": 1, "max_new_tokens": 4}, "threads": 1,
                          "log": {"plot": False, "tensorboard": False, "progress": "none"}},
                         reward_funcs=[reward], train_dataset=Dataset.from_list(rows[:16]),
                         eval_dataset=Dataset.from_list(rows[16:]), run_dir=str(tmp_path / "run"), echo=lambda s: None)
    assert summary["complete"] and summary["dataset"]["eval_rows"] == 4
    prompt, completion, _ = seen[0]
    assert prompt[0]["role"] == "user" and completion[0]["role"] == "assistant"
    # before-training eval and step 1 see global_step 0, step 2 sees 1, the final eval 2 (steps completed)
    assert sorted({step for _, _, step in seen}) == [0, 1, 2]


def test_overlapping_eval_file_is_refused_then_marked_when_allowed(tmp_path, tiny_llama_dir, monkeypatch):
    write_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    lines = (tmp_path / "rl.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:40]))
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[35:45]))  # rows 35..39 are in both: 5 of 10
    args = ["train", "--data", "train.jsonl", "--reward", "rewards.py:reverse_reward", "--set", "data.eval.path=eval.jsonl",
            "--set", f"model.path={tiny_llama_dir}", "--set", "train.steps=1", "--set", "eval.n_samples=1",
            "--set", "rollout.max_new_tokens=4", "--set", "eval.max_new_tokens=4", *COMMON]
    refused = cli(*args, "--run-dir", "r1")
    assert refused.exit_code == 2 and "5 of 10 eval prompts also appear in the train source" in refused.output
    assert not (tmp_path / "r1" / "checkpoints").exists()
    ok = cli(*args, "--run-dir", "r2", "--allow-contaminated")
    assert ok.exit_code == 0, ok.output
    seeds = json.loads((tmp_path / "r2" / "seeds.json").read_text())["dataset"]
    assert seeds["eval_overlap_train"] == 5 and seeds["contaminated"] and seeds["allow_contaminated"]
    ev = cli("eval", "r2", "--n", "1", "--max-new-tokens", "4")
    assert ev.exit_code == 2 and "5 of 10 eval prompts also appear in the train rows" in ev.output
    ev = cli("eval", "r2", "--n", "1", "--max-new-tokens", "4", "--allow-contaminated")
    assert ev.exit_code == 0 and json.loads((tmp_path / "r2" / "eval.json").read_text())["contaminated"] is True
