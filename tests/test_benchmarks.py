"""The benchmark scripts run end to end on one tiny configuration (no timing is asserted here:
speed is measured by benchmarks/step_time.py as tilt/TRL ratios, see benchmarks/README.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_step_time_benchmark_runs_one_tiny_point(tmp_path):
    """Both sides (tilt and TRL's GRPOTrainer) take alternating steps on the shipped model and the
    report has every phase, the ratios, RSS and the FLOP share."""
    res = tmp_path / "step.json"
    stdout = _run(["benchmarks/step_time.py", "--sizes", "1m", "--tokens", "4", "--warmup", "0", "--repeats", "1",
                   "--prompts", "2", "--group", "2", "--threads", "1", "--out", str(res)])
    assert "| 1m" in stdout and "matmul peak" in stdout
    data = json.loads(res.read_text())
    (pt,) = data["points"]
    assert data["meta"]["trl"].startswith("1.16") and data["meta"]["matmul_peak_flops"] > 0
    for side in ("tilt", "trl"):
        s = pt[side]
        assert s["completion_tokens"] == 2 * 2 * 4, "min_new_tokens must force the length on both sides"
        assert all(s[k] > 0 for k in ("generate", "ref", "fwd_bwd", "optimizer", "step_s", "rss_mb", "train_flops"))
        assert s["step_s"] >= s["generate"] + s["fwd_bwd"]
    assert 0 < pt["tilt"]["floor_s"] < pt["tilt"]["step_s"], "the FLOP floor at peak is below the measured step"
    assert abs(pt["ratio"]["step_s"] - pt["tilt"]["step_s"] / pt["trl"]["step_s"]) < 1e-12


def test_time_to_accuracy_benchmark_runs_tiny(tmp_path):
    """TRL and tilt each train 2 steps from the shipped model with held-out checks after each; tilt
    runs the fast config under the benchmark's fixed G, B and tokens."""
    res = tmp_path / "tta.json"
    stdout = _run(["benchmarks/time_to_accuracy.py", "--steps", "2", "--eval-every", "1", "--lrs", "1e-5",
                   "--prompts", "2", "--group", "2", "--eval-per-cell", "2", "--threads", "1", "--out", str(res),
                   "--tilt-config", "configs/fast.yaml"])
    assert "TRL best held-out pass@1" in stdout
    data = json.loads(res.read_text())
    assert [c["step"] for c in data["trl_curves"]["1e-05"]] == [0, 1, 2]
    assert [c["step"] for c in data["tilt_runs"][0]["curve"]] == [0, 1, 2]
    assert data["target_pass1"] == max(c["pass1"] for c in data["trl_curves"]["1e-05"])
    cfg = data["tilt_runs"][0]["config"]
    assert cfg["selection"]["name"] == "dynamic_sampling" and cfg["train"]["minibatch_by"] == "group"
    assert (cfg["rollout"]["group_size"], cfg["rollout"]["prompts_per_step"]) == (2, 2)
