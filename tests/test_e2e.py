"""A short end-to-end run whose reward rises, plus the run-directory contract."""
from __future__ import annotations

import json

from tilt.config import load_config
from tilt.trainer import train


def starts_with_seven(prompts, completions, **_):
    """A reward a random model can learn fast: 1 if the completion starts with '7'."""
    return [1.0 if c.startswith("7") else 0.0 for c in completions]


def test_short_run_reward_rises_and_run_dir_is_complete(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={run}", "train.steps=24",
                             "rollout.prompts_per_step=8", "rollout.group_size=8", "rollout.max_new_tokens=4",
                             "optim.lr=0.01", "tasks.eval_per_cell=2", "tasks.mix=addition:1",
                             "checkpoint.every=12", "log.progress=none", "threads=1"])
    lines: list[str] = []
    summary = train(cfg, reward_fns=[starts_with_seven], echo=lines.append)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert first < 0.2 and last > first + 0.4, (first, last)
    # run directory contract
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "seeds.json", "summary.json"):
        assert (run / name).stat().st_size > 0, name
    assert any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000012", "step_0000024"]
    assert (run / "final" / "config.json").exists() and (run / "final" / "tokenizer.json").exists()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the two closing lines, in exactly this form
    assert lines[-2].startswith("held-out pass@1 (T=1.0): ") and " -> " in lines[-2]
    assert lines[-1].startswith("held-out greedy: ") and " -> " in lines[-1]
    for line in lines[-2:]:
        before, after = line.split(": ", 1)[1].split(" -> ")
        assert 0 <= float(before) <= 1 and 0 <= float(after) <= 1
    assert summary["complete"] and json.loads((run / "seeds.json").read_text())["train"]["addition"]["count"] == 192
