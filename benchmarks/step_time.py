"""Step time of tilt vs TRL's GRPOTrainer on identical work, alternating A B A B.

    python benchmarks/step_time.py                       # the full grid (sizes x lengths)
    python benchmarks/step_time.py --sizes 1m --tokens 8 --repeats 2   # one tiny point

Per grid point, one tilt and one TRL worker process (``workers.py``) load the same model
directory and prompts; the driver lets them take turns, one RL step at a time (warm-up steps
first, then ``--repeats`` measured steps each), and reports per-phase medians, the tilt/TRL
ratios, tokens/s, peak RSS and the training phase's FLOP/s as a fraction of the matmul peak
this machine reaches (measured here, before the grid). Results: JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SIZES, matmul_flops, measure_matmul_peak, model_dir  # noqa: E402

PHASES = ("generate", "ref", "fwd_bwd", "optimizer", "step_s")


class Worker:
    """A worker process speaking the JSON-lines protocol of ``workers.py``."""

    def __init__(self, side: str, argv: list[str], log: Path):
        self.side = side
        self.err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "workers.py"), side, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        self.hello = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.side} worker died (exit {self.proc.returncode}); see {self.err.name}")
        return json.loads(line)

    def ask(self, cmd: str = "go") -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.ask("exit")
        self.proc.wait(timeout=120)
        self.err.close()
        return out


def run_point(size: str, tokens: int, a: argparse.Namespace, peak: float) -> dict:
    """Alternate tilt and TRL steps at one grid point; return medians, ratios and extras."""
    model = model_dir(size, Path(a.cache))
    steps = a.warmup + a.repeats
    argv = ["--model", str(model), "--steps", str(steps), "--tokens", str(tokens), "--group", str(a.group),
            "--prompts", str(a.prompts), "--beta", str(a.beta), "--lr", str(a.lr), "--threads", str(a.threads)]
    if a.force_length:
        argv.append("--force-length")
    logs = Path(a.out).with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    sides = {s: Worker(s, argv, logs / f"{size}-{tokens}-{s}.log") for s in ("tilt", "trl")}
    rows: dict[str, list[dict]] = {"tilt": [], "trl": []}
    for i in range(steps):
        order = ("tilt", "trl") if i % 2 == 0 else ("trl", "tilt")  # A B, B A, ...: neither always goes first
        for s in order:
            r = sides[s].ask()
            if i >= a.warmup:
                rows[s].append(r)
    rss = {s: w.close()["rss_mb"] for s, w in sides.items()}
    from transformers import AutoConfig, AutoModelForCausalLM

    net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    out = {"size": size, "tokens": tokens, "params": sides["tilt"].hello["params"]}
    for s in ("tilt", "trl"):
        med = {p: statistics.median(r[p] for r in rows[s]) for p in PHASES}
        seq = statistics.median(r["seq_len"] for r in rows[s])
        # executed FLOPs: what this side's training phase actually computes (shared prompts, recompute)
        flops = statistics.median(matmul_flops(net, r["train_positions"], r["seq_len"], r["passes"]) for r in rows[s])
        out[s] = {**med, "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in rows[s]),
                  "rss_mb": rss[s], "train_flops_frac": flops / med["fwd_bwd"] / peak, "train_flops": flops,
                  "completion_tokens": statistics.median(r["tokens"] for r in rows[s]), "seq_len": seq}
    out["ratio"] = {p: out["tilt"][p] / out["trl"][p] if out["trl"][p] > 0 else None for p in PHASES}
    # tilt's FLOP floor: its step's matmul FLOPs (training 3 passes + the reference pass over the same
    # positions + one forward per sampled token, decode attention left out) at the measured peak
    t = out["tilt"]
    t["floor_s"] = (t["train_flops"] * 4 / 3 + matmul_flops(net, t["completion_tokens"], 0, 1.0)) / peak
    return out


def table(points: list[dict]) -> str:
    """Markdown table of medians (s) and tilt/TRL ratios."""
    head = ("| size | new tokens | step tilt / TRL (s) | ratio | generate | ref | fwd+bwd | optimizer | "
            "tokens/s tilt / TRL | peak RSS tilt / TRL (MiB) | training phase FLOP/s, share of matmul peak, tilt / TRL | "
            "tilt's FLOP floor / TRL step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        t, r, q = p["tilt"], p["trl"], p["ratio"]
        f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {p['size']} ({p['params'] / 1e6:.1f}M) | {p['tokens']} | {t['step_s']:.3f} / {r['step_s']:.3f} | "
                     f"**{q['step_s']:.2f}** | {f(q['generate'])} | {f(q['ref'])} | {f(q['fwd_bwd'])} | "
                     f"{f(q['optimizer'])} | {t['tokens_per_s']:.0f} / {r['tokens_per_s']:.0f} | "
                     f"{t['rss_mb']:.0f} / {r['rss_mb']:.0f} | {t['train_flops_frac']:.0%} / {r['train_flops_frac']:.0%} | "
                     f"{t['floor_s'] / r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1m,10m,30m")
    p.add_argument("--tokens", default="8,64,256")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-force-length", dest="force_length", action="store_false",
                   help="let EOS end completions (default: both sides mask EOS until max new tokens)")
    p.add_argument("--cache", default=str(HERE / ".cache"), help="where the 10M/30M model directories go")
    p.add_argument("--out", default=str(HERE / "results" / "step_time.json"))
    a = p.parse_args()
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    peak = measure_matmul_peak(a.threads)
    print(f"matmul peak ({a.threads} threads, fp32 1024^3): {peak / 1e9:.1f} GFLOP/s", flush=True)
    points = []
    for size in a.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
        for tokens in (int(t) for t in a.tokens.split(",")):
            t0 = time.time()
            pt = run_point(size, tokens, a, peak)
            points.append(pt)
            print(f"{size} x {tokens}: tilt {pt['tilt']['step_s']:.3f}s  TRL {pt['trl']['step_s']:.3f}s  "
                  f"ratio {pt['ratio']['step_s']:.2f}  ({time.time() - t0:.0f}s)", flush=True)
    import torch
    import transformers
    import trl

    meta = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "threads": a.threads,
            "matmul_peak_flops": peak, "args": vars(a)}
    Path(a.out).write_text(json.dumps({"meta": meta, "points": points}, indent=1))
    print(table(points))


if __name__ == "__main__":
    main()
