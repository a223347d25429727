"""Step time of tilt vs TRL's GRPOTrainer on identical work, alternating one step at a time.

    python benchmarks/step_time.py                       # the full grid (sizes x lengths)
    python benchmarks/step_time.py --sizes 1m --tokens 8 --repeats 2   # one tiny point
    python benchmarks/step_time.py --trl best            # TRL at its best settings only

Per grid point, one tilt worker and one TRL worker per preset (``workers.py``: ``best`` =
gradient checkpointing off, ``default`` = GRPOConfig's defaults) load the same model directory
and prompts; the driver lets them take turns, one RL step at a time, in a rotating order
(warm-up steps first, then ``--repeats`` measured steps each), and reports per-phase medians,
tilt / TRL ratios against each preset, tokens/s, peak RSS, the training phase's FLOP/s as a
fraction of the matmul peak this machine reaches (measured here, before the grid), and tilt's
distance to the limit: its step over its own FLOP floor, with the phase that spends the most time
above its floor, and its step over that floor plus the decode attention's KV-cache reads at the read
bandwidth measured here (the sampling phase streams the whole fp32 cache once per token, which no FLOP
count sees). Results: JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch  # noqa: E402
from common import (SIZES, decode_kv_bytes, matmul_flops, measure_matmul_peak, measure_read_bandwidth,  # noqa: E402
                    model_dir)

from tilt.heap import ENVIRONMENT as HEAP_ENV  # noqa: E402

PHASES = ("generate", "ref", "fwd_bwd", "optimizer", "step_s")


class Worker:
    """A worker process speaking the JSON-lines protocol of ``workers.py``."""

    def __init__(self, side: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.side = side
        self.err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "workers.py"), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1,
                                     env=None if env is None else {**os.environ, **env})
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


def side_argv(side: str, compile_trl: bool) -> list[str]:
    """Worker arguments of a side: ``tilt``, ``tilt_bf16`` (bf16 decode products + token_tis), ``tilt_kv16``
    (float32 products, a float16 completion KV cache + token_tis), ``tilt_kv8`` (the same with an int8 cache),
    ``trl_best`` or ``trl_default``, each TRL
    preset also as ``trl_<preset>_heap`` (``side_env``)."""
    if side in TILT_SIDES.values():
        return ["tilt", *TILT_ARGS[side]]
    preset = side.removeprefix("trl_").removesuffix("_heap")
    return ["trl", "--trl-preset", preset, *(["--trl-compile"] if compile_trl else [])]


TILT_SIDES = {"fp32": "tilt", "bf16": "tilt_bf16", "kv16": "tilt_kv16", "kv8": "tilt_kv8"}  # --tilt name: side
TILT_ARGS = {"tilt": [], "tilt_bf16": ["--decode-dtype", "bfloat16"], "tilt_kv16": ["--kv-cache-dtype", "float16"],
             "tilt_kv8": ["--kv-cache-dtype", "int8"]}


def side_env(side: str) -> dict[str, str] | None:
    """Extra environment of a side's worker: for ``trl_<preset>_heap``, what tilt.heap sets in tilt's own
    process (large blocks from the heap, freed memory kept mapped) as glibc's environment variables."""
    return HEAP_ENV if side.startswith("trl_") and side.endswith("_heap") else None


def turn_order(sides: list[str], i: int) -> list[str]:
    """Who goes when in round ``i``: the sides rotate by one each round and every other block of
    ``len(sides)`` rounds runs the rotation backwards, so no side always follows the same one
    (two sides: A B, B A, A B, ...; three: A B C, B C A, C A B, B A C, ...)."""
    k = i % len(sides)
    order = sides[k:] + sides[:k]
    return order[::-1] if (i // len(sides)) % 2 else order


def phase_floors(net, side: dict, peak: float, generate_peak: float | None = None) -> dict[str, float]:
    """tilt's FLOP floor per phase at the measured peak (s): each phase's matmul FLOPs / peak.

    generate: one forward per sampled token (decode attention left out), at ``generate_peak`` when
    sampling multiplies in another dtype (bf16); ref: one forward over the training positions;
    fwd_bwd: the training phase's executed passes over them (3; 2 with LoRA); optimizer and the rest
    (scoring, batching): 0.
    """
    fwd = side["train_flops"] / side["passes"]
    gen = matmul_flops(net, side["completion_tokens"], 0, 1.0) / (generate_peak or peak)
    return {"generate": gen, "ref": fwd / peak,
            "fwd_bwd": side["train_flops"] / peak, "optimizer": 0.0, "other": 0.0}


def run_point(size: str, tokens: int, a: argparse.Namespace, peak: float, bf16_peak: float,
              bandwidth: float) -> dict:
    """Alternate tilt and the TRL presets one step at a time at one grid point; return medians,
    ratios (tilt / each TRL preset) and tilt's distance to its FLOP floor.

    The floor's peak is read at the point itself: after every measured round of steps, a short matmul peak
    (``--point-peak``, the default), and the floor uses their median. On the shared 2-core VM the peak moved by
    10 % within minutes (345-397 GFLOP/s at the starts of five runs in the twentieth session), so a reading taken
    before the whole grid misstates a later point's floor. The floor at the run's first reading is kept beside
    it (``to_floor_run_peak``)."""
    model = model_dir(size, Path(a.cache))
    steps = a.warmup + a.repeats
    argv = ["--model", str(model), "--steps", str(steps), "--tokens", str(tokens), "--group", str(a.group),
            "--prompts", str(a.prompts), "--beta", str(a.beta), "--lr", str(a.lr), "--threads", str(a.threads)]
    if a.force_length:
        argv.append("--force-length")
    if a.lora:
        argv += ["--lora", str(a.lora)]
    logs = Path(a.out).with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    tilts = [TILT_SIDES[t] for t in a.tilt.split(",")]
    names = [*tilts, *(f"trl_{t}" for t in a.trl.split(","))]
    sides = {s: Worker(s, side_argv(s, a.trl_compile) + argv, logs / f"{size}-{tokens}-{s}.log", side_env(s))
             for s in names}
    rows: dict[str, list[dict]] = {s: [] for s in names}
    run_peak, run_bf16_peak = peak, bf16_peak
    peaks: list[float] = []
    bf16_peaks: list[float] = []
    for i in range(steps):
        for s in turn_order(names, i):
            r = sides[s].ask()
            if i >= a.warmup:
                rows[s].append(r)
        if i >= a.warmup and a.point_peak:  # the peak in the same minutes as the steps (workers idle meanwhile)
            peaks.append(measure_matmul_peak(a.threads, warm_s=0.5))
            if "tilt_bf16" in tilts:
                bf16_peaks.append(measure_matmul_peak(a.threads, dtype=torch.bfloat16, warm_s=0.5))
    if peaks:
        peak = statistics.median(peaks)
    if bf16_peaks:
        bf16_peak = statistics.median(bf16_peaks)
    rss = {s: w.close()["rss_mb"] for s, w in sides.items()}
    from transformers import AutoConfig, AutoModelForCausalLM

    net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    out = {"size": size, "tokens": tokens, "params": sides[tilts[0]].hello["params"], "sides": names,
           "lora": a.lora, "matmul_peak_flops": peak, "matmul_peaks": peaks, "bf16_matmul_peak_flops": bf16_peak}
    for s in names:
        med = {p: statistics.median(r[p] for r in rows[s]) for p in PHASES}
        seq = statistics.median(r["seq_len"] for r in rows[s])
        # executed FLOPs: what this side's training phase actually computes (shared prompts, recompute)
        flops = statistics.median(matmul_flops(net, r["train_positions"], r["seq_len"], r["passes"]) for r in rows[s])
        out[s] = {**med, "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in rows[s]),
                  "rss_mb": rss[s], "train_flops_frac": flops / med["fwd_bwd"] / peak, "train_flops": flops,
                  "passes": statistics.median(r["passes"] for r in rows[s]),
                  "completion_tokens": statistics.median(r["tokens"] for r in rows[s]), "seq_len": seq}
    for ts in tilts:  # ratio_<trl side> for tilt (fp32), ratio_<tilt side>_<trl side> for the others
        for s in names[len(tilts):]:
            key = f"ratio_{s}" if ts == "tilt" else f"ratio_{ts}_{s}"
            out[key] = {p: out[ts][p] / out[s][p] if out[s][p] > 0 else None for p in PHASES}
        # distance to the limit: tilt's step over its FLOP floor (its step's matmul FLOPs at the measured
        # peak of the dtype each phase multiplies in), and the phase with the most time above its own floor
        t = out[ts]
        floors = phase_floors(net, t, peak, bf16_peak if ts == "tilt_bf16" else None)
        t["floor_s"] = sum(floors.values())
        t["to_floor"] = t["step_s"] / t["floor_s"]
        at_run = phase_floors(net, t, run_peak, run_bf16_peak if ts == "tilt_bf16" else None)
        t["to_floor_run_peak"] = t["step_s"] / sum(at_run.values())
        spent = {p: t[p] for p in ("generate", "ref", "fwd_bwd", "optimizer")}
        spent["other"] = t["step_s"] - sum(spent.values())
        t["excess_s"] = {p: spent[p] - floors[p] for p in floors}
        t["dominant"] = max(t["excess_s"], key=t["excess_s"].get)
        # and with the decode attention's KV reads at the measured read bandwidth added to generate's floor:
        # that phase streams the whole cache (fp32, or fp16 for tilt_kv16) once per token, which no FLOP count sees
        rows = a.group * a.prompts
        t["kv_bytes"] = decode_kv_bytes(net.config, rows, round(t["completion_tokens"] / rows),
                                        elem={"tilt_kv16": 2, "tilt_kv8": 1}.get(ts, 4),
                                        scale_bytes=4 if ts == "tilt_kv8" else 0)
        t["kv_stream_s"] = t["kv_bytes"] / bandwidth
        t["to_floor_kv"] = t["step_s"] / (t["floor_s"] + t["kv_stream_s"])
    return out


def table(points: list[dict]) -> str:
    """Markdown table: step medians (s), tilt / TRL ratios per preset and per phase (against the
    first preset, TRL at its best), and tilt's distance to its FLOP floor."""
    trl = [s for s in points[0]["sides"] if s.startswith("trl_")]
    first = trl[0]
    head = ("| size | new tokens | step tilt / " + " / ".join(trl) + " (s) | "
            + " | ".join(f"tilt / {s}" for s in trl)
            + f" | generate | ref | fwd+bwd | optimizer (vs {first}) | tokens/s tilt / {first} | "
            f"peak RSS tilt / {first} (MiB) | training FLOP/s share of peak, tilt / {first} | "
            "tilt step / tilt's FLOP floor | most time above floor | tilt step / (FLOP floor + KV stream) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    for p in (p for p in points if "tilt" in p):  # points with the fp32 side
        t, b, q = p["tilt"], p[first], p[f"ratio_{first}"]
        steps = " / ".join(f"{p[s]['step_s']:.3f}" for s in ("tilt", *trl))
        ratios = " | ".join(f"**{p[f'ratio_{s}']['step_s']:.2f}**" for s in trl)
        lines.append(f"| {p['size']} ({p['params'] / 1e6:.1f}M) | {p['tokens']} | {steps} | {ratios} | "
                     f"{f(q['generate'])} | {f(q['ref'])} | {f(q['fwd_bwd'])} | {f(q['optimizer'])} | "
                     f"{t['tokens_per_s']:.0f} / {b['tokens_per_s']:.0f} | {t['rss_mb']:.0f} / {b['rss_mb']:.0f} | "
                     f"{t['train_flops_frac']:.0%} / {b['train_flops_frac']:.0%} | "
                     f"{t['to_floor']:.2f} ({t['floor_s']:.3f} s at {p['matmul_peak_flops'] / 1e9:.0f} GFLOP/s) | "
                     f"{t['dominant']} (+{t['excess_s'][t['dominant']]:.3f} s) | {t['to_floor_kv']:.2f} "
                     f"({t['kv_bytes'] / 1e9:.1f} GB, {t['kv_stream_s']:.3f} s) |")
    for side, what in (("tilt_bf16", "bf16 decode products (`rollout.decode_dtype=bfloat16`"),
                       ("tilt_kv16", "a float16 completion KV cache (`rollout.kv_cache_dtype=float16`"),
                       ("tilt_kv8", "an int8 completion KV cache (`rollout.kv_cache_dtype=int8`")):
        alt = [p for p in points if side in p]
        if not alt:
            continue
        lines += ["", f"tilt with {what}, correction `token_tis`):", "",
                  f"| size | new tokens | step {side} / tilt (s) | {side} / " + f" | {side} / ".join(trl)
                  + f" | generate (vs {first}) | peak RSS (MiB) | {side} step / its floor | most time above floor "
                  f"| {side} step / (FLOP floor + KV stream) |",
                  "|---|---|---|" + "---|" * len(trl) + "---|---|---|---|---|"]
        for p in alt:
            t = p[side]
            ratios = " | ".join(f"**{p[f'ratio_{side}_{s}']['step_s']:.2f}**" for s in trl)
            fp32 = f"{p['tilt']['step_s']:.3f}" if "tilt" in p else "—"
            lines.append(f"| {p['size']} | {p['tokens']} | {t['step_s']:.3f} / {fp32} | {ratios} | "
                         f"{f(p[f'ratio_{side}_{first}']['generate'])} | {t['rss_mb']:.0f} | "
                         f"{t['to_floor']:.2f} ({t['floor_s']:.3f} s) | {t['dominant']} "
                         f"(+{t['excess_s'][t['dominant']]:.3f} s) | {t['to_floor_kv']:.2f} "
                         f"({t['kv_bytes'] / 1e9:.1f} GB, {t['kv_stream_s']:.3f} s) |")
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
    p.add_argument("--trl", default="best,default",
                   help="TRL presets to alternate with tilt, in report order: best (gradient checkpointing "
                        "off) and/or default (GRPOConfig's defaults), each also as <preset>_heap (run with tilt's "
                        "allocator setting, HEAP_ENV); ratios are tilt / each")
    p.add_argument("--trl-compile", action="store_true", help="also torch_compile=True on the TRL side(s)")
    p.add_argument("--tilt", default="fp32",
                   help="tilt sides: fp32 (the model's dtype throughout), bf16 (rollout.decode_dtype=bfloat16 "
                        "with correction token_tis), kv16 (rollout.kv_cache_dtype=float16 with correction "
                        "token_tis) and/or kv8 (rollout.kv_cache_dtype=int8, the same), e.g. fp32,bf16,kv16")
    p.add_argument("--no-point-peak", dest="point_peak", action="store_false",
                   help="the floors at the matmul peak read once before the grid (default: read after every "
                        "measured round of each point, their median)")
    p.add_argument("--lora", type=int, default=0,
                   help="LoRA rank on all linear layers, both sides (alpha = 2 r); 0 = full fine-tuning")
    p.add_argument("--cache", default=str(HERE / ".cache"), help="where the 10M/30M model directories go")
    p.add_argument("--out", default=str(HERE / "results" / "step_time.json"))
    a = p.parse_args()
    bad = [t for t in a.trl.split(",") if t not in ("best", "default", "best_heap", "default_heap")]
    if bad or not a.trl:
        raise SystemExit(f"--trl {a.trl!r}: a comma-separated list of best, default, best_heap, default_heap")
    if not a.tilt or [t for t in a.tilt.split(",") if t not in TILT_SIDES]:
        raise SystemExit(f"--tilt {a.tilt!r}: a comma-separated list of {', '.join(TILT_SIDES)}")
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    peak = measure_matmul_peak(a.threads)
    bf16_peak = measure_matmul_peak(a.threads, dtype=torch.bfloat16)
    bandwidth = measure_read_bandwidth(a.threads)
    print(f"matmul peak ({a.threads} threads, 1024^3): fp32 {peak / 1e9:.1f}, bf16 {bf16_peak / 1e9:.1f} GFLOP/s; "
          f"read bandwidth (512 MiB) {bandwidth / 1e9:.1f} GB/s", flush=True)
    points = []
    for size in a.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
        for tokens in (int(t) for t in a.tokens.split(",")):
            t0 = time.time()
            pt = run_point(size, tokens, a, peak, bf16_peak, bandwidth)
            points.append(pt)
            lead = next(s for s in pt["sides"] if s.startswith("tilt"))  # the first tilt side asked for
            key = "ratio_" if lead == "tilt" else f"ratio_{lead}_"
            trl = "  ".join(f"{s} {pt[s]['step_s']:.3f}s (ratio {pt[key + s]['step_s']:.2f})"
                            for s in pt["sides"] if s.startswith("trl_"))
            trl += "".join(f"  {s} {pt[s]['step_s']:.3f}s (/floor {pt[s]['to_floor']:.2f})"
                           for s in pt["sides"] if s.startswith("tilt") and s != lead)
            print(f"{size} x {tokens}: {lead} {pt[lead]['step_s']:.3f}s  {trl}  "
                  f"{lead}/floor {pt[lead]['to_floor']:.2f}  (point peak {pt['matmul_peak_flops'] / 1e9:.0f}; "
                  f"{time.time() - t0:.0f}s)", flush=True)
    import transformers
    import trl

    meta = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "threads": a.threads,
            "matmul_peak_flops": peak, "bf16_matmul_peak_flops": bf16_peak, "read_bandwidth_bytes_s": bandwidth,
            "args": vars(a)}
    Path(a.out).write_text(json.dumps({"meta": meta, "points": points}, indent=1))
    print(table(points))


if __name__ == "__main__":
    main()
