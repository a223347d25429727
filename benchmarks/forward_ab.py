"""A/B of tilt's lean teacher-forced pass (tilt.fastforward) at a git revision against the working tree.

    python benchmarks/forward_ab.py --size 10m --tokens 64 --rev HEAD~1 --repeats 9
    python benchmarks/forward_ab.py --size smollm2 --tokens 64 --lora 16 --rev HEAD~1 --repeats 5
    python benchmarks/forward_ab.py --size 30m --tokens 256 --rev HEAD~1 --kernels --repeats 5

``--kernels``: the baseline side also runs tilt/kernels as it was at ``--rev`` (its Python wrappers and its C
sources, built into their own library), the working tree's side the current ones.

Loads ``tilt/fastforward.py`` as it was at ``--rev`` beside the current one, samples one batch, then
times the reference pass (no grad) and a forward + backward of the completion log-probs (the LM head
inside ``head_token_logprobs``, in micro-batches of ``--chunk-tokens`` forward positions, by default the
learner's ``train.micro_batch_tokens="auto"`` for the model) with each module, alternating (A B, B A, ...)
in one process; prints how far apart the log-probs and gradients are and the medians (the first
repeat dropped as warm-up). benchmarks/README.md, speed work 29.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SIZES, sampled_batch  # noqa: E402


def module_at(rev: str):
    """tilt.fastforward as of git revision ``rev``, imported under another name."""
    out = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:tilt/fastforward.py"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"--rev {rev}: git cannot show tilt/fastforward.py there: {out.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:  # the module is compiled by exec_module; the file can go
        path = Path(tmp) / "fastforward_at_rev.py"
        path.write_text(out.stdout)
        spec = importlib.util.spec_from_file_location("fastforward_at_rev", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def kernels_at(rev: str):
    """The tilt.kernels package (its Python wrappers and C sources) as of git revision ``rev``, imported under
    another name from a temporary copy; it builds its own library (same compiler, flags and cache) and checks it."""
    tmp = Path(tempfile.mkdtemp(prefix="tilt-kernels-ab-"))
    atexit.register(shutil.rmtree, tmp, True)
    listed = subprocess.run(["git", "-C", str(HERE.parent), "ls-tree", "--name-only", f"{rev}:tilt/kernels"],
                            capture_output=True, text=True)
    if listed.returncode:
        raise SystemExit(f"--kernels: git cannot list tilt/kernels at {rev}: {listed.stderr.strip()}")
    for name in listed.stdout.split():
        out = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:tilt/kernels/{name}"],
                             capture_output=True, text=True)
        (tmp / name).write_text(out.stdout)
    spec = importlib.util.spec_from_file_location("tilt_kernels_at_rev", tmp / "__init__.py",
                                                  submodule_search_locations=[str(tmp)])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.library() is None:
        raise SystemExit(f"--kernels: tilt.kernels at {rev} is {mod.status()}")
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1m", choices=list(SIZES))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rev", default="HEAD", help="the git revision whose tilt/fastforward.py is the baseline")
    p.add_argument("--kernels", action="store_true",
                   help="the baseline side also runs tilt/kernels (wrappers and C sources) as of --rev")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (alpha = 2 r), B random")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="forward positions per micro-batch (default: tilt's auto budget; 0: the whole batch at once)")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed", action="store_false",
                   help="leave glibc's allocator as it is (tilt's trainer sets it to keep freed memory: tilt.heap)")
    p.add_argument("--cache", default=str(HERE / ".cache"))
    a = p.parse_args()
    import tilt.fastforward as current
    from tilt.rollout import _plain_head, auto_micro_batch_tokens, token_chunks, unique_prompts
    from tilt.token_logprobs import head_token_logprobs

    torch.set_num_threads(a.threads)
    if a.keep_freed:
        from tilt.heap import keep_freed_memory

        keep_freed_memory()
    old = module_at(a.rev)
    if a.kernels:
        old.kernels = kernels_at(a.rev)
    model, _, ids, mask, b = sampled_batch(a.size, Path(a.cache), a.tokens, a.prompts, a.group, a.lora)
    budget = auto_micro_batch_tokens(model) if a.chunk_tokens is None else a.chunk_tokens
    chunks = []  # per micro-batch: its rows' distinct prompts, which prompt each row has, its completions
    for rows in token_chunks(ids, mask, a.tokens, budget or None):
        u_ids, u_mask, inverse = unique_prompts(ids[rows], mask[rows])
        chunks.append((u_ids, u_mask, inverse, b.completion_ids[rows], b.completion_mask[rows]))
    head = _plain_head(model)
    params = [q for q in model.parameters() if q.requires_grad]

    def run(side: str, grad: bool):
        mod = current if side == "now" else old
        model.zero_grad(set_to_none=True)
        out = []
        with torch.set_grad_enabled(grad):
            for u_ids, u_mask, inverse, c_ids, c_mask in chunks:
                states = mod.shared_completion_states(model, u_ids, u_mask, inverse, c_ids, c_mask)
                logp, _ = head_token_logprobs(states, *head, c_ids)
                if grad:
                    logp.sum().backward()
                out.append(logp.detach())
        return torch.cat(out), [q.grad.clone() for q in params] if grad else []

    (lp_old, g_old), (lp_new, g_new) = run("rev", True), run("now", True)
    rel = max(((x - y).abs().max() / x.abs().max().clamp(min=1e-30)).item() for x, y in zip(g_old, g_new))
    print(f"log-probs max |diff| {(lp_old - lp_new).abs().max().item():.3g}, gradients max |diff| / max |grad| "
          f"{rel:.3g}")
    times: dict[str, list[float]] = {f"{k}_{s}": [] for k in ("ref", "fwd_bwd") for s in ("rev", "now")}
    for r in range(a.repeats):
        for side in (("now", "rev") if r % 2 == 0 else ("rev", "now")):
            for name, grad in (("fwd_bwd", True), ("ref", False)):
                t = time.perf_counter()
                run(side, grad)
                times[f"{name}_{side}"].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    print(f"{a.size} x {a.tokens} tokens, lora {a.lora}, {a.prompts} prompts x {a.group}, {len(chunks)} "
          f"micro-batch(es) of <= {budget or 'all'} positions, {a.repeats} repeats: "
          + "  ".join(f"{k} {v:.4f}s" for k, v in med.items()))
    for name in ("fwd_bwd", "ref"):
        base = a.rev + (" (with its kernels)" if a.kernels else "")
        print(f"{name}: now / {base} = {med[f'{name}_now'] / med[f'{name}_rev']:.3f}")


if __name__ == "__main__":
    main()
