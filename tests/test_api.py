"""The README's Python API example runs as written, with TRL-style reward callables and Datasets."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its <!-- api-example --> python block"
    return m.group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md:api-example", "exec"), {})
    run = tmp_path / "runs" / "api-example"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["dataset"]["train_rows"] == 50 and summary["dataset"]["eval_rows"] == 10
    # the printed number is the held-out pass@1 the run wrote, a mean of 0/1 rewards
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(summary["heldout"]["pass1_after"]) and 0.0 <= printed <= 1.0
    seeds = json.loads((run / "seeds.json").read_text())
    assert seeds["dataset"]["train"] == "<in-memory Dataset>" and seeds["dataset"]["eval_overlap_train"] == 0


def test_api_rejects_bad_reward_funcs(tmp_path):
    import tilt
    from tilt.config import ConfigError

    with pytest.raises(ConfigError, match="reward_funcs must be callables"):
        tilt.train({"run_dir": str(tmp_path / "r")}, reward_funcs=[3])
