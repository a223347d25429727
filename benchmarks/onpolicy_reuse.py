"""Can an exactly on-policy update skip the policy's teacher-forced forward? A measurement.

    python benchmarks/onpolicy_reuse.py --size 10m --tokens 64 --repeats 10

When one optimizer step follows one sampling pass with nothing in between (epochs = 1,
minibatches = 1, no selection that drops rows), the sampling pass's forward IS the policy's
forward: same weights, same tokens, the same values up to float rounding. Keeping what the
backward needs means recording the autograd graph while sampling, one token at a time. This
script measures both ways of getting the same policy gradient, in one process, interleaved
(A B C, C B A, ... so a busy machine slows each way alike):

* ``recompute`` (tilt's path): sampling without grad (``nograd_decode``, already paid for by the
  rollout) + the teacher-forced forward and backward of ``tilt.rollout.completion_logits``;
* ``keep``: the same token-by-token decode, but with grad (the graph kept; HF's concatenating
  cache, since the in-place buffer cache cannot be recorded), then the backward through it;
* ``forward_only``: recompute's forward alone, the most that any scheme keeping activations from
  sampling (with a batched, hand-written backward) could save.

Keeping pays only if ``keep - nograd_decode < recompute``: the kept graph's extra decoding cost
plus its backward must beat one batched forward + backward. It also reports the two gradients'
largest difference (decoding and teacher forcing round differently, so they agree to ~1e-6, not
bit for bit). Timings on a busy machine are indicative; the ratios are what the run is for.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SIZES, model_dir, train_items  # noqa: E402


def decode_logits(model, prompt_ids, prompt_mask, completion_ids):
    """Logits for every completion token [N, T, V], fed one token at a time with a KV cache (what
    sampling computes); records the autograd graph when grad is enabled."""
    attn = prompt_mask.clone()  # [N, P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [N, P]
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, nxt = out.past_key_values, pos[:, -1] + 1  # [N]
    logits = [out.logits[:, -1]]
    for t in range(completion_ids.shape[1] - 1):
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)  # [N, P+t+1]
        out = model(input_ids=completion_ids[:, t:t + 1], attention_mask=attn, position_ids=nxt[:, None],
                    past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, nxt + 1
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)  # [N, T, V]


def policy_loss(logits, completion_ids, adv):
    """-mean over tokens of A * log pi(token): the on-policy gradient's surrogate (ratio 1)."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)  # [N, T]
    return -(adv * logp).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1m", choices=list(SIZES))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(HERE / ".cache"))
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tilt.rollout import SamplingParams, completion_logits, encode_prompts, generate

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    path = model_dir(a.size, Path(a.cache))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [it.prompt for it in train_items(a.prompts) for _ in range(a.group)]
    ids, mask = encode_prompts(tok, prompts)
    rb = generate(model, ids, mask, params=SamplingParams(max_new_tokens=a.tokens, min_new_tokens=a.tokens),
                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    comp, cmask = rb.completion_ids, rb.completion_mask  # [N, T], all ones (length forced)
    adv = torch.randn(comp.shape, generator=torch.Generator().manual_seed(1))  # [N, T]

    def recompute():
        logits, _ = completion_logits(model, ids, mask, comp, cmask)
        policy_loss(logits, comp, adv).backward()

    def keep():
        policy_loss(decode_logits(model, ids, mask, comp), comp, adv).backward()

    def forward_only():  # the part of ``recompute`` that kept activations could at most save
        logits, _ = completion_logits(model, ids, mask, comp, cmask)
        policy_loss(logits, comp, adv)

    def nograd_decode():
        with torch.no_grad():
            decode_logits(model, ids, mask, comp)

    ways = {"recompute": recompute, "keep": keep, "nograd_decode": nograd_decode, "forward_only": forward_only}
    grads = {}
    for name in ("recompute", "keep"):
        model.zero_grad(set_to_none=True)
        ways[name]()
        grads[name] = [q.grad.clone() for q in model.parameters()]
    diff = max(float((g - h).abs().max()) for g, h in zip(grads["recompute"], grads["keep"]))
    scale = max(float(g.abs().max()) for g in grads["recompute"])
    times: dict[str, list[float]] = {k: [] for k in ways}
    names = list(ways)
    for i in range(a.repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = med["keep"] - med["nograd_decode"]
    print(f"{a.size} x {a.tokens} tokens, {comp.shape[0]} rows, {a.repeats} interleaved repeats (medians, s):")
    for k, v in med.items():
        print(f"  {k:14s} {v:.4f}")
    print(f"  keeping the sampling graph costs {extra:.4f} s more than sampling without grad; "
          f"recomputing costs {med['recompute']:.4f} s: keep / recompute = {extra / med['recompute']:.2f}")
    print(f"  the teacher-forced forward is {med['forward_only'] / med['recompute']:.0%} of recompute: the most a "
          f"hand-written backward over activations saved while sampling could remove")
    print(f"  gradient max |recompute - keep| = {diff:.2e} (largest gradient entry {scale:.2e})")


if __name__ == "__main__":
    main()
