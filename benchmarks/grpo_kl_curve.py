"""GRPO's held-out pass@1 and KL(pi || pi_ref) along training, on the items and seeds of
benchmarks/qsharp_shipped.py, to compare with Q♯ decoding at equal accuracy gain.

STEPS=40 EVERY=5 python benchmarks/grpo_kl_curve.py  (writes benchmarks/results/grpo_kl_curve.json and
benchmarks/results/qsharp_shipped_es_kl.png; PLOT_ONLY=1 redraws the figure)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import qsharp_shipped as B  # noqa: E402

from tilt.decoding.lm import Decoding  # noqa: E402
from tilt.model import load_policy  # noqa: E402
from tilt.tasks.mix import eval_items, parse_mix  # noqa: E402

STEPS, EVERY = int(os.environ.get("STEPS", 40)), int(os.environ.get("EVERY", 5))


def main():
    torch.set_num_threads(1)
    ref = load_policy("shipped")
    items = eval_items(parse_mix(B.MIX), per_cell=B.PER_CELL)
    curves = {}
    with tempfile.TemporaryDirectory() as work:
        for seed in range(B.SEEDS):
            run = Path(work) / f"grpo{seed}"
            subprocess.run([sys.executable, "-m", "tilt.cli", "train", "--run-dir", str(run), "--set", f"seed={seed}",
                            "--set", f"train.steps={STEPS}", "--set", "threads=1", "--set", "eval.every=0",
                            "--set", "log.plot=false", "--set", "log.tensorboard=false", "--set", "log.progress=none",
                            "--set", f"checkpoint.every={EVERY}", "--set", "checkpoint.keep=1000"],
                           check=True, stdout=subprocess.DEVNULL)
            pol = load_policy("shipped")
            for ckpt in sorted((run / "checkpoints").glob("step_*")):
                step = int(ckpt.name.split("_")[1])
                pol.model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
                res = B.run_decoder(pol, ref, items, Decoding("sample"), seed)
                curves.setdefault(str(step), []).append(res)
                print(f"seed {seed} step {step}: {res}", flush=True)
    (B.OUT / "grpo_kl_curve.json").write_text(json.dumps(curves, indent=1))




def plot_with_curve():
    """qsharp_shipped_es.png with GRPO's (KL, pass@1) along training as a line (mean over seeds)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads((B.OUT / "qsharp_shipped_es.json").read_text())["summary"]
    curve = json.loads((B.OUT / "grpo_kl_curve.json").read_text())
    steps = sorted(curve, key=int)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, v in summary.items():
        ax.errorbar(v["kl"][0], v["pass1"][0], xerr=v["kl"][1], yerr=v["pass1"][1], fmt="o", label=name)
    xs = [statistics.mean(r["kl"] for r in curve[s]) for s in steps]
    ys = [statistics.mean(r["pass1"] for r in curve[s]) for s in steps]
    ax.plot(xs, ys, "-", color="gray", label="GRPO along training (steps " + ", ".join(steps) + ")")
    ax.set_xlabel("KL(decoder or policy || pi_ref), nats per completion")
    ax.set_ylabel("held-out pass@1 (3 seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(B.OUT / "qsharp_shipped_es_kl.png", dpi=120)


if __name__ == "__main__":
    if not os.environ.get("PLOT_ONLY"):
        main()
    plot_with_curve()
