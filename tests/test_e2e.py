"""A short end-to-end run whose reward rises, plus the run-directory contract."""
from __future__ import annotations

import json
from pathlib import Path

from tilt.config import load_config
from tilt.trainer import train


REPO = Path(__file__).resolve().parents[1]


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
    # every logged metric is documented with its formula
    documented = (REPO / "docs" / "metrics.md").read_text()
    for key in sorted({k for r in rows for k in r if k != "step"}):
        assert f"`{key}`" in documented, f"metric {key} is missing from docs/metrics.md"


def test_final_model_loads_with_transformers_and_generates(tmp_path):
    """The shipped Llama after a short GRPO run: AutoModelForCausalLM loads final/ and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", "train.steps=2", "rollout.prompts_per_step=2",
                             "tasks.eval_per_cell=2", "log.progress=none", "log.tensorboard=false"])
    train(cfg, echo=lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(run / "final"), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    enc = tok("5+4=", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > enc.input_ids.shape[1] and text.strip() != ""
