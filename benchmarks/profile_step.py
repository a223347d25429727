"""Profile tilt's RL step at one grid point: phase times and the top operators.

    python benchmarks/profile_step.py --size 1m --tokens 8
    python benchmarks/profile_step.py --size 30m --tokens 64 --steps 2 --top 25

Every speed change in tilt cites a profile from this script (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MIX, model_dir, with_overrides  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1m")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--no-profile", action="store_true", help="phase times and peak RSS only (the profiler holds memory)")
    p.add_argument("--cache", default=str(HERE / ".cache"))
    p.add_argument("--set", nargs="*", default=[], help="extra tilt config overrides, e.g. train.micro_batch_tokens=1024")
    a = p.parse_args()
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    from tilt.config import Config
    from tilt.trainer import build, data_offset, rollout_step
    from tilt.wiring.sampling import TrainStream

    cfg = Config.model_validate({
        "threads": a.threads, "model": {"path": str(model_dir(a.size, Path(a.cache)))}, "tasks": {"mix": MIX},
        "rollout": {"group_size": 8, "prompts_per_step": 8, "max_new_tokens": a.tokens, "min_new_tokens": a.tokens},
        "loss": {"name": "dapo"}, "optim": {"lr": 1e-5}, "train": {"steps": a.steps + 1, "minibatches": 1}})
    if a.set:  # --set overrides on top of the benchmark's config
        cfg = Config.model_validate(with_overrides(cfg.model_dump(), a.set))
    parts = build(cfg)
    stream = TrainStream(cfg.tasks.mix, offset=data_offset(cfg.seed))

    def step(i: int) -> dict:
        t = time.perf_counter()
        batch, m, _ = rollout_step(parts, cfg, stream, i)
        m.update(parts.learner.update(batch))
        m["time/step_s"] = time.perf_counter() - t
        return m

    step(1)  # warm-up
    if a.no_profile:
        prof, rows = None, [step(i + 2) for i in range(a.steps)]
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            rows = [step(i + 2) for i in range(a.steps)]
    for k in sorted(k for k in rows[0] if k.startswith("time/")):
        print(f"{k:24s} {sum(r[k] for r in rows) / len(rows):.4f}")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    import resource
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
