"""A/B of tilt's teacher-forced pass: the lean pass (tilt.fastforward) against Hugging Face's two calls.

    python benchmarks/lean_forward.py --size 1m --tokens 16 --prompts 4 --group 8 --repeats 9
    python benchmarks/lean_forward.py --size 10m --tokens 64 --prompts 8 --group 8

Samples one batch, then times the reference pass (no grad) and a forward + backward of the
log-probs, alternating lean and HF (A B, B A, ...) in one process; prints medians (the first
repeat is dropped as warm-up) and the lean / HF ratios. benchmarks/README.md, speed work 11.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIZES, sampled_batch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1m", choices=list(SIZES))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (alpha = 2 r), B random")
    p.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".cache"))
    a = p.parse_args()
    from tilt.rollout import completion_logits

    torch.set_num_threads(a.threads)
    model, _, ids, mask, b = sampled_batch(a.size, Path(a.cache), a.tokens, a.prompts, a.group, a.lora)

    def ref(lean: bool) -> None:
        with torch.no_grad():
            completion_logits(model, ids, mask, b.completion_ids, b.completion_mask, lean=lean)

    def fwd_bwd(lean: bool) -> None:
        model.zero_grad(set_to_none=True)
        logits, _ = completion_logits(model, ids, mask, b.completion_ids, b.completion_mask, lean=lean)
        torch.log_softmax(logits, -1).gather(-1, b.completion_ids[..., None]).sum().backward()

    times: dict[str, list[float]] = {f"{k}_{s}": [] for k in ("ref", "fwd_bwd") for s in ("lean", "hf")}
    for r in range(a.repeats):
        for lean in ((True, False) if r % 2 == 0 else (False, True)):
            side = "lean" if lean else "hf"
            for name, fn in (("ref", ref), ("fwd_bwd", fwd_bwd)):
                t = time.perf_counter()
                fn(lean)
                times[f"{name}_{side}"].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    print(f"{a.size} x {a.tokens} tokens, {a.prompts} prompts x {a.group}: "
          + "  ".join(f"{k} {v:.4f}s" for k, v in med.items()))
    for name in ("ref", "fwd_bwd"):
        print(f"{name}: lean / hf = {med[f'{name}_lean'] / med[f'{name}_hf']:.3f}")


if __name__ == "__main__":
    main()
