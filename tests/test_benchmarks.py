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
    """tilt and TRL's GRPOTrainer at its best settings and at its defaults take alternating steps on
    the shipped model, and the report has every phase, both ratios, RSS, the FLOP share and tilt's
    distance to its FLOP floor."""
    res = tmp_path / "step.json"
    stdout = _run(["benchmarks/step_time.py", "--sizes", "1m", "--tokens", "4", "--warmup", "0", "--repeats", "1",
                   "--prompts", "2", "--group", "2", "--threads", "1", "--out", str(res)])
    assert "| 1m" in stdout and "matmul peak" in stdout and "tilt / trl_best | tilt / trl_default" in stdout
    data = json.loads(res.read_text())
    (pt,) = data["points"]
    assert data["meta"]["trl"].startswith("1.16") and data["meta"]["matmul_peak_flops"] > 0
    assert pt["sides"] == ["tilt", "trl_best", "trl_default"]
    for side in pt["sides"]:
        s = pt[side]
        assert s["completion_tokens"] == 2 * 2 * 4, "min_new_tokens must force the length on every side"
        assert all(s[k] > 0 for k in ("generate", "ref", "fwd_bwd", "optimizer", "step_s", "rss_mb", "train_flops"))
        assert s["step_s"] >= s["generate"] + s["fwd_bwd"]
    # the presets differ only in gradient checkpointing: 4 passes (recomputed forward) against 3
    assert (pt["trl_best"]["passes"], pt["trl_default"]["passes"]) == (3.0, 4.0)
    assert pt["trl_default"]["train_flops"] == 4 / 3 * pt["trl_best"]["train_flops"]
    t = pt["tilt"]
    assert 0 < t["floor_s"] < t["step_s"], "the FLOP floor at peak is below the measured step"
    assert abs(t["to_floor"] - t["step_s"] / t["floor_s"]) < 1e-12
    # the floor's peak read at the point (one measured round: one reading), the run's first reading kept beside it
    assert len(pt["matmul_peaks"]) == 1 and pt["matmul_peak_flops"] == pt["matmul_peaks"][0] > 0
    run_floor = t["floor_s"] * pt["matmul_peak_flops"] / data["meta"]["matmul_peak_flops"]
    assert abs(t["to_floor_run_peak"] - t["step_s"] / run_floor) < 1e-9
    assert t["dominant"] in t["excess_s"] and t["excess_s"][t["dominant"]] == max(t["excess_s"].values())
    # the second distance: the decode attention's KV reads at the measured read bandwidth added to the floor
    bandwidth = data["meta"]["read_bandwidth_bytes_s"]
    assert bandwidth > 0 and t["kv_bytes"] > 0 and abs(t["kv_stream_s"] - t["kv_bytes"] / bandwidth) < 1e-12
    assert abs(t["to_floor_kv"] - t["step_s"] / (t["floor_s"] + t["kv_stream_s"])) < 1e-12
    assert t["to_floor_kv"] < t["to_floor"] and "FLOP floor + KV stream" in stdout
    for side in ("trl_best", "trl_default"):
        assert abs(pt[f"ratio_{side}"]["step_s"] - t["step_s"] / pt[side]["step_s"]) < 1e-12


def test_step_time_bf16_kv16_and_lora_sides(tmp_path):
    """``--tilt fp32,bf16,kv16,kv8`` adds a tilt side that samples with bf16 products (its generate floor at the
    measured bf16 peak), one with a float16 completion KV cache (its KV stream half the bytes) and one with an int8
    cache (a quarter, plus a float scale per key and value), with ratios
    against TRL; ``--lora R`` runs LoRA on both sides (2 passes of training FLOPs), the other samplers included.
    One invocation covers them (the full-weight fp32 sides run in ``test_step_time_benchmark_runs_one_tiny_point``):
    each invocation starts its workers."""
    res = tmp_path / "lora_bf16.json"
    stdout = _run(["benchmarks/step_time.py", "--sizes", "1m", "--tokens", "4", "--warmup", "0", "--repeats", "1",
                   "--prompts", "2", "--group", "2", "--threads", "1", "--trl", "best", "--lora", "2",
                   "--tilt", "fp32,bf16,kv16,kv8", "--out", str(res)])
    assert "tilt_bf16 / trl_best" in stdout and "tilt_kv16 / trl_best" in stdout and "tilt_kv8 / trl_best" in stdout
    data = json.loads(res.read_text())
    (pt,) = data["points"]
    assert pt["sides"] == ["tilt", "tilt_bf16", "tilt_kv16", "tilt_kv8", "trl_best"]
    assert data["meta"]["bf16_matmul_peak_flops"] > 0
    for side in ("tilt_bf16", "tilt_kv16", "tilt_kv8"):
        t = pt[side]
        assert t["completion_tokens"] == 2 * 2 * 4 and 0 < t["floor_s"] < t["step_s"]
        assert abs(pt[f"ratio_{side}_trl_best"]["step_s"] - t["step_s"] / pt["trl_best"]["step_s"]) < 1e-12
    assert pt["tilt_kv16"]["floor_s"] == pt["tilt"]["floor_s"] and pt["tilt_kv16"]["kv_bytes"] == pt["tilt"]["kv_bytes"] / 2
    assert pt["tilt"]["kv_bytes"] / 4 < pt["tilt_kv8"]["kv_bytes"] < pt["tilt_kv16"]["kv_bytes"]
    assert pt["lora"] == 2 and pt["tilt"]["passes"] == pt["trl_best"]["passes"] == pt["tilt_bf16"]["passes"] == 2.0
    assert all(pt[s]["ref"] > 0 for s in ("tilt", "trl_best"))  # TRL's reference: the policy with its adapter off


def test_lean_forward_ab_runs():
    """The lean-pass A/B script runs on the shipped model and prints both ratios."""
    stdout = _run(["benchmarks/lean_forward.py", "--size", "1m", "--tokens", "4", "--prompts", "2", "--group", "2",
                   "--repeats", "2", "--threads", "1"])
    assert "ref: lean / hf =" in stdout and "fwd_bwd: lean / hf =" in stdout


def test_packed_decode_ab_runs():
    """The packed-products A/B script runs on the shipped model; both settings sample the same tokens."""
    stdout = _run(["benchmarks/packed_decode.py", "--size", "1m", "--tokens", "4", "--repeats", "1", "--threads", "1"])
    assert "1m x 4: packed" in stdout and "same tokens True" in stdout


def test_fused_decode_ab_runs():
    """The same script's fused-kernels A/B: both settings sample the same tokens."""
    stdout = _run(["benchmarks/packed_decode.py", "--size", "1m", "--tokens", "4", "--repeats", "1", "--threads", "1",
                   "--compare", "fused"])
    assert "1m x 4: fused kernels" in stdout and "same tokens True" in stdout


def test_packed_bf16_decode_ab_runs():
    """The same script's bf16 A/B (oneDNN's prepacked linear against bf16 F.linear): the same tokens where
    the CPU runs bf16 natively; elsewhere it stops with a message saying there is nothing to compare."""
    import tilt.fastdecode as fd

    cmd = ["benchmarks/packed_decode.py", "--size", "1m", "--tokens", "4", "--repeats", "1", "--threads", "1",
           "--compare", "packed_bf16"]
    if fd.DNN_BF16_PACKING:
        stdout = _run(cmd)
        assert "1m x 4: packed bf16" in stdout and "same tokens True" in stdout
    else:
        out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode != 0 and "nothing to compare" in out.stderr


def test_sampler_ab_says_when_the_vocabulary_is_too_small():
    """The sampler A/B compares only where draws are by inverse CDF; the shipped model's 53 tokens are not."""
    out = subprocess.run([sys.executable, "benchmarks/packed_decode.py", "--size", "1m", "--tokens", "4",
                          "--repeats", "1", "--threads", "1", "--compare", "sampler"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "53 tokens draw by torch.multinomial" in out.stderr


def test_forward_ab_runs_against_a_git_revision():
    """The teacher-forced pass A/B loads tilt/fastforward.py from git beside the current module and
    runs both on the shipped model; they compute the same log-probs."""
    stdout = _run(["benchmarks/forward_ab.py", "--size", "1m", "--tokens", "4", "--prompts", "2", "--group", "2",
                   "--repeats", "1", "--threads", "1", "--rev", "HEAD"])
    assert "fwd_bwd: now / HEAD" in stdout and "log-probs max |diff| 0," in stdout
    bad = subprocess.run([sys.executable, "benchmarks/forward_ab.py", "--rev", "no-such-rev"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--rev no-such-rev: git cannot show tilt/fastforward.py" in bad.stderr


def test_turn_order_rotates_and_reverses():
    """Three sides: rounds 0-2 rotate A B C, B C A, C A B; rounds 3-5 run them backwards."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import turn_order

    got = ["".join(turn_order(list("ABC"), i)) for i in range(6)]
    assert got == ["ABC", "BCA", "CAB", "CBA", "ACB", "BAC"]
    assert ["".join(turn_order(list("AB"), i)) for i in range(4)] == ["AB", "BA", "BA", "AB"]


def test_time_to_accuracy_benchmark_runs_tiny(tmp_path):
    """TRL and tilt each train 2 steps from the shipped model with held-out checks after each; tilt
    runs the fast config under the benchmark's fixed G, B and tokens."""
    res = tmp_path / "tta.json"
    stdout = _run(["benchmarks/time_to_accuracy.py", "--steps", "2", "--eval-every", "1", "--lrs", "1e-5",
                   "--prompts", "2", "--group", "2", "--eval-per-cell", "2", "--threads", "1", "--out", str(res),
                   "--tilt-config", "configs/fast.yaml", "--tilt-set", "train.minibatches=2"])  # at most B=2 groups
    assert "TRL best held-out pass@1" in stdout
    data = json.loads(res.read_text())
    assert [c["step"] for c in data["trl_curves"]["1e-05"]] == [0, 1, 2]
    assert [c["step"] for c in data["tilt_runs"][0]["curve"]] == [0, 1, 2]
    assert data["target_pass1"] == max(c["pass1"] for c in data["trl_curves"]["1e-05"])
    cfg = data["tilt_runs"][0]["config"]
    assert cfg["selection"]["name"] == "dynamic_sampling" and cfg["train"]["minibatch_by"] == "group"
    assert (cfg["rollout"]["group_size"], cfg["rollout"]["prompts_per_step"]) == (2, 2)


def test_onpolicy_reuse_measurement_runs_and_gradients_agree():
    """The on-policy pass-reuse measurement runs on the shipped model (4 tokens, 2 rows) and the two
    ways of getting the policy gradient (decoding with the graph kept, teacher-forced recompute)
    give the same gradient to 1e-5 (decode and teacher forcing round differently)."""
    import re

    stdout = _run(["benchmarks/onpolicy_reuse.py", "--size", "1m", "--tokens", "4", "--prompts", "1", "--group", "2",
                   "--repeats", "1", "--threads", "1"])
    assert "keep / recompute =" in stdout
    diff = float(re.search(r"gradient max \|recompute - keep\| = (\S+)", stdout).group(1))
    assert diff < 1e-5


def test_decode_kv_bytes_counts_the_cache_each_token_reads():
    """Two rows, 3 layers, 2 KV heads of size 4, 3 new tokens: step t reads t + 1 cached positions of keys
    and values, 1 + 2 + 3 = 6 positions x 2 (K, V) x 2 heads x 4 floats x 4 bytes per row and layer."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import decode_kv_bytes

    cfg = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                          head_dim=4)
    assert decode_kv_bytes(cfg, rows=2, tokens=3) == 2 * 3 * 6 * 2 * 2 * 4 * 4
    assert decode_kv_bytes(cfg, rows=2, tokens=3, elem=1, scale_bytes=4) == 2 * 3 * 6 * 2 * 2 * (4 + 4)  # int8 + scale
    cfg.num_key_value_heads, cfg.head_dim = None, None  # plain multi-head attention: hidden / heads
    assert decode_kv_bytes(cfg, rows=2, tokens=3) == 2 * 3 * 6 * 2 * 4 * 4 * 4
