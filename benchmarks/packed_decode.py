"""A/B of tilt's sampling with and without one decode-step speed-up:

* ``--compare packed`` (default): the decode products through MKL's packed GEMM against F.linear
  (benchmarks/README.md, speed work 28);
* ``--compare fused``: the grouped decoder's attention, norms and SwiGLU as tilt.kernels' fused C
  kernels against torch ops (speed work 30);
* ``--compare packed_bf16``: bf16 decode products (``rollout.decode_dtype=bfloat16``) through oneDNN's
  linear with a prepacked weight against bf16 F.linear (speed work 32);
* ``--compare sampler``: each token drawn by tilt.kernels' inverse-CDF sampler against torch ops
  (vocabularies of ``CDF_SAMPLING_MIN_VOCAB`` tokens and more, e.g. SmolLM2's; speed work 33);
* ``--compare products``: the float32 decode products through tilt.kernels' ``linear`` (``C_PRODUCTS``)
  against MKL's packed GEMM (speed work 39);
* ``--compare swiglu``: the fused step's gate/up product and SwiGLU as one call (``linear_swiglu``,
  ``C_SWIGLU``) against the product then ``silu_mul`` (speed work 40);
* ``--compare calls``: the fused step's library calls made straight (``GroupedDecoder._calls``) against
  through tilt.kernels' Python wrappers (speed work 41);
* ``--compare kernels --rev REV``: the working tree's tilt.kernels (wrappers and C sources) against
  tilt/kernels as of git revision REV, built into its own library (speed work 38); also prints the
  time spent in the decode attention (``attend``) and in the products on each side;
* ``--compare kv16``: a float16 completion KV cache (``rollout.kv_cache_dtype=float16``) against one in
  float32 (speed work 44), both through the wrappers (so ``attend`` and the products are timed as above).

    python benchmarks/packed_decode.py --size 30m --tokens 64 --repeats 6
    python benchmarks/packed_decode.py --size smollm2 --tokens 64 --repeats 2 --compare fused
    python benchmarks/packed_decode.py --size 30m --tokens 64 --repeats 6 --compare packed_bf16
    python benchmarks/packed_decode.py --size smollm2 --tokens 64 --repeats 3 --compare sampler
    python benchmarks/packed_decode.py --size 10m --tokens 256 --repeats 3 --compare kernels --rev HEAD~1
    python benchmarks/packed_decode.py --size 30m --tokens 64 --repeats 6 --compare products
    python benchmarks/packed_decode.py --size 10m --tokens 256 --repeats 3 --compare kv16

One process, the two settings interleaved (A B, B A, ...), 8 prompts x 8 samples, the length forced;
prints the median seconds of each, their ratio, whether the sampled tokens are equal and the largest
log-prob difference.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import model_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="10m", help="1m, 10m, 30m or smollm2")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(HERE / ".cache"))
    p.add_argument("--compare", choices=("packed", "fused", "packed_bf16", "sampler", "kernels", "products", "swiglu", "calls", "kv16"), default="packed")
    p.add_argument("--rev", default="HEAD", help="--compare kernels: the git revision whose tilt/kernels is the baseline")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import tilt.fastdecode as fd
    from tilt.model import load_policy
    import tilt.rollout as rollout
    from tilt.rollout import SamplingParams, generate

    if a.compare in ("packed", "products") and not fd.MKL_PACKING:
        sys.exit("this torch build has no MKL packed GEMM (torch.ops.mkl._mkl_linear): nothing to compare")
    if a.compare == "packed_bf16" and not fd.DNN_BF16_PACKING:
        sys.exit("no oneDNN bf16 linear with a prepacked weight here (torch.ops.mkldnn, native bf16): nothing to compare")
    if a.compare in ("fused", "sampler", "kernels", "products", "swiglu", "calls", "kv16") and fd.kernels.library() is None:
        sys.exit(f"tilt.kernels: {fd.kernels.status()}: nothing to compare")
    usable = fd.kernels.usable
    current = fd.kernels
    straight = fd.GroupedDecoder._calls
    spent = {"attend": 0.0, "products": 0.0}
    timing = a.compare in ("kernels", "products", "swiglu", "kv16")  # attend / products timed through the wrappers
    if a.compare == "kv16":
        fd.GroupedDecoder._calls = lambda self, n: None
    if timing:
        from forward_ab import kernels_at

        baseline = kernels_at(a.rev) if a.compare == "kernels" else current

        def timed(fn, key):
            def call(*args, **kw):
                t0 = time.perf_counter()
                out = fn(*args, **kw)
                spent[key] += time.perf_counter() - t0
                return out
            return call

        for mod in {current, baseline}:
            mod.attend = timed(mod.attend, "attend")
            if hasattr(mod, "linear_swiglu"):
                mod.linear_swiglu = timed(mod.linear_swiglu, "products")
        fd._lin = timed(fd._lin, "products")
    path = str(model_dir(a.size, Path(a.cache)))
    pol = load_policy(path)
    vocab = pol.model.config.vocab_size
    if a.compare == "sampler" and vocab < rollout.CDF_SAMPLING_MIN_VOCAB:
        sys.exit(f"{a.size}: {vocab} tokens draw by torch.multinomial (inverse CDF from "
                 f"{rollout.CDF_SAMPLING_MIN_VOCAB} on): nothing to compare")
    ids = torch.randint(3, min(vocab, 50), (8, 17), generator=torch.Generator().manual_seed(1)).repeat_interleave(8, 0)
    mask = torch.ones_like(ids)
    dtype = torch.bfloat16 if a.compare == "packed_bf16" else None
    params = SamplingParams(max_new_tokens=a.tokens, min_new_tokens=a.tokens, matmul_dtype=dtype)

    def run(on: bool):
        nonlocal params
        if a.compare == "packed":
            fd.MKL_PACKING = on
            fd.C_PRODUCTS = False
        elif a.compare == "calls":
            fd.GroupedDecoder._calls = straight if on else (lambda self, n: None)
        elif a.compare in ("products", "swiglu"):
            setattr(fd, "C_PRODUCTS" if a.compare == "products" else "C_SWIGLU", on)
            spent.update(attend=0.0, products=0.0)
        elif a.compare == "kv16":
            params = replace(params, kv_dtype=torch.float16 if on else None)
            spent.update(attend=0.0, products=0.0)
        elif a.compare == "packed_bf16":
            fd.DNN_BF16_PACKING = on
        elif a.compare == "sampler":
            rollout.C_SAMPLING = on
        elif a.compare == "kernels":
            fd.kernels = rollout.kernels = current if on else baseline
            fd.C_PRODUCTS = hasattr(fd.kernels, "linear")  # each side's products as of its kernels
            fd.C_SWIGLU = hasattr(fd.kernels, "linear_swiglu")
            spent.update(attend=0.0, products=0.0)
        else:
            fd.kernels.usable = usable if on else (lambda *tensors: False)
        with torch.no_grad():
            t = time.perf_counter()
            b = generate(pol.model, ids, mask, params=params, eos_id=pol.eos_id, pad_id=pol.pad_id,
                         generator=torch.Generator().manual_seed(0))
            took = time.perf_counter() - t
            if timing:
                parts[on].append(dict(spent))
            return took, b

    parts: dict[bool, list[dict]] = {True: [], False: []}  # time in attend / products (kernels, products)
    run(True), run(False)  # warm-up
    parts = {True: [], False: []}  # the warm-up's left out
    times, out = {True: [], False: []}, {}
    for r in range(a.repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            t, out[on] = run(on)
            times[on].append(t)
    new, old = statistics.median(times[True]), statistics.median(times[False])
    same = bool(torch.equal(out[True].completion_ids, out[False].completion_ids))
    diff = (out[True].logprobs - out[False].logprobs).abs().max().item()
    names = {"packed": ("packed", "F.linear"), "fused": ("fused kernels", "torch ops"),
             "packed_bf16": ("packed bf16", "bf16 F.linear"), "sampler": ("C sampler", "torch sampling"),
             "kernels": ("kernels now", f"kernels at {a.rev}"),
             "products": ("tilt.kernels.linear", "MKL packed"),
             "swiglu": ("linear_swiglu", "linear + silu_mul"),
             "calls": ("straight calls", "wrappers"), "kv16": ("float16 KV cache", "float32 KV cache")}[a.compare]
    print(f"{a.size} x {a.tokens}: {names[0]} {new:.4f} s, {names[1]} {old:.4f} s, ratio {new / old:.3f}; "
          f"same tokens {same}, max |log-prob difference| {diff:.2e} ({a.repeats} repeats each)")
    if timing:
        for on, name in ((True, names[0]), (False, names[1])):
            print(f"  {name}: " + ", ".join(f"{k} {statistics.median(x[k] for x in parts[on]):.4f} s"
                                            for k in ("attend", "products")))


if __name__ == "__main__":
    main()
