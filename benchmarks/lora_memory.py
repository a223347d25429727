"""Peak RSS of a short LoRA run vs full fine-tuning with a separate reference model (issue 18, item 2).

Runs `tilt train -c configs/smollm2_lora.yaml` for 2 steps twice, one after the other, each in its
own process: as shipped (LoRA, reference = adapters disabled) and with model.lora.enabled=false (full
fine-tuning, the reference a second copy of the weights). Peak RSS is the child's ru_maxrss.
Extra arguments are passed to both runs as --set values, e.g. train.micro_batch_tokens=2048.

    python benchmarks/lora_memory.py [train.micro_batch_tokens=2048 ...]
Needs the model: tilt models install smollm2-135m-instruct.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

CHILD = ("import resource, sys\nfrom tilt.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
RUNS = {"lora": [], "full": ["model.lora.enabled=false", "optim.lr=1e-5"]}


def peak_rss_mb(extra: list[str], run_dir: str) -> tuple[float, float]:
    sets = ["threads=1", "train.steps=2", "tasks.eval_per_cell=4", "eval.n_samples=2", "log.progress=none", *extra]
    t = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, "train", "-c", "configs/smollm2_lora.yaml",
                          *[a for s in sets for a in ("--set", s)], "--run-dir", run_dir],
                         capture_output=True, text=True, check=True)
    kb = next(int(ln.split()[1]) for ln in out.stdout.splitlines() if ln.startswith("PEAK_RSS_KB"))
    return kb / 1024, time.time() - t


def main(extra: list[str]) -> None:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in RUNS.items():
            mb, wall = peak_rss_mb([*sets, *extra], f"{tmp}/{name}")
            res[name] = {"peak_rss_mb": round(mb), "wall_s": round(wall)}
            print(name, res[name], flush=True)
    res["ratio"] = round(res["lora"]["peak_rss_mb"] / res["full"]["peak_rss_mb"], 3)
    print(json.dumps({"extra": extra, **res}))


if __name__ == "__main__":
    main(sys.argv[1:])
