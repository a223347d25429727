"""Q♯-guided decoding of the untrained shipped model vs plain sampling vs a GRPO-trained policy.

For each seed: train a Q head (`tilt train-value` logic) on the train split, then score held-out
items with several decoders: pass@1 (mean sampled reward), a one-sample estimate of
KL(decoder || pi_ref) per completion (sum_t log pi_dec - log pi_ref, averaged), and tokens per
completion. A GRPO policy (`tilt train`, defaults, STEPS steps) gives the training-side point:
its KL(pi || pi_ref) is estimated the same way from its own samples.

STEPS=100 python benchmarks/qsharp_shipped.py   (writes benchmarks/results/qsharp_shipped.{json,png})
STEPS=100 PROMPTS=1024 VAL_FRAC=0.2 TAG=_es REUSE_GRPO=benchmarks/results/qsharp_shipped.json \
    python benchmarks/qsharp_shipped.py   (early-stopped head on 3 x 1024 roll-outs -> qsharp_shipped_es.*)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tilt.decoding.lm import Decoding
from tilt.decoding.train_value import train_value
from tilt.model import load_policy
from tilt.rewards import verifier_reward
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate, sequence_logprobs
from tilt.tasks.mix import eval_items, parse_mix, sample_items

MIX = "addition:1,multiplication:1,countdown:1,sorting:1-2"
SEEDS = int(os.environ.get("SEEDS", 3))
PER_CELL, N, T = int(os.environ.get("PER_CELL", 32)), 4, 16
ROUNDS, PROMPTS, STEPS = 3, int(os.environ.get("PROMPTS", 384)), int(os.environ.get("STEPS", 60))
VAL_FRAC = float(os.environ.get("VAL_FRAC", 0.0))  # > 0: early-stop the head on this held-out fraction
TAG = os.environ.get("TAG", "")  # output name suffix
REUSE_GRPO = os.environ.get("REUSE_GRPO")  # a previous results JSON whose GRPO rows are reused (same items, seeds)
OUT = Path("benchmarks/results")


def score(pol, items, batch, ref_model):
    texts = decode_completions(pol.tokenizer, batch, pol.eos_id)
    rows = [it for it in items for _ in range(N)]
    rewards = verifier_reward([it.prompt for it in rows], texts, task=[it.task for it in rows],
                              columns=[it.columns for it in rows])
    ref_logp, _ = sequence_logprobs(ref_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                    batch.completion_mask)
    kl = ((batch.logprobs - ref_logp) * batch.completion_mask).sum(-1)  # [N] one-sample KL estimates
    return {"pass1": sum(rewards) / len(rewards), "kl": float(kl.mean()),
            "tokens": float(batch.completion_mask.sum(-1).float().mean())}


def run_decoder(pol, ref, items, dec, seed):
    rows = [it for it in items for _ in range(N)]
    ids, mask = encode_prompts(pol.tokenizer, [it.prompt for it in rows])
    gen = torch.Generator().manual_seed(1000 + seed)
    batch, _ = dec.generate(pol.model, ids, mask, max_new_tokens=T, eos_id=pol.eos_id, pad_id=pol.pad_id,
                            generator=gen)
    return score(pol, items, batch, ref.model)


def grpo_policy(seed, work):
    run = Path(work) / f"grpo{seed}"
    subprocess.run([sys.executable, "-m", "tilt.cli", "train", "--run-dir", str(run), "--set", f"seed={seed}",
                    "--set", f"train.steps={STEPS}", "--set", "threads=1", "--set", "eval.every=0",
                    "--set", "log.plot=false", "--set", "log.tensorboard=false", "--set", "log.progress=none",
                    "--set", "checkpoint.every=100000"], check=True, stdout=subprocess.DEVNULL)
    return load_policy(str(run / "final"))


def main():
    torch.set_num_threads(1)
    ref = load_policy("shipped")
    items = eval_items(parse_mix(MIX), per_cell=PER_CELL)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            rounds = [sample_items(parse_mix(MIX), split="train", start=60_000_000 + seed * 1_000_000 + r * PROMPTS,
                                   count=PROMPTS) for r in range(ROUNDS)]
            head, stats = train_value(ref, rounds, beta=0.5, top_k=None, max_new_tokens=T, seed=seed,
                                      val_frac=VAL_FRAC, epochs=300 if VAL_FRAC else 200,
                                      log=lambda m: print(f"seed {seed} {m}", flush=True))
            decoders = {"sample": Decoding("sample"), "top_k k=5": Decoding("top_k", {"k": 5}),
                        "min_p p=0.1": Decoding("min_p", {"p": 0.1}),
                        "qsharp beta=1": Decoding("qsharp", {"beta": 1.0}, head),
                        "qsharp beta=0.5": Decoding("qsharp", {"beta": 0.5}, head),
                        "qsharp beta=0.2": Decoding("qsharp", {"beta": 0.2}, head)}
            for name, dec in decoders.items():
                res = run_decoder(ref, ref, items, dec, seed)
                results.setdefault(name, []).append(res)
                print(f"seed {seed} {name}: {res}", flush=True)
            key = f"GRPO {STEPS} steps (sample)"
            if REUSE_GRPO:
                res = json.loads(Path(REUSE_GRPO).read_text())["per_seed"][key][seed]
            else:
                res = run_decoder(grpo_policy(seed, work), ref, items, Decoding("sample"), seed)
            results.setdefault(key, []).append(res)
            print(f"seed {seed} GRPO: {res}", flush=True)
            (OUT / f"qsharp_shipped{TAG}.json").write_text(json.dumps(results, indent=1))
    summary = {k: {m: (statistics.mean(r[m] for r in v), statistics.stdev(r[m] for r in v) / len(v) ** 0.5
                       if len(v) > 1 else 0.0) for m in ("pass1", "kl", "tokens")} for k, v in results.items()}
    (OUT / f"qsharp_shipped{TAG}.json").write_text(json.dumps({"per_seed": results, "summary": summary}, indent=1))
    plot(summary)
    for k, v in summary.items():
        print(f"| {k} | {v['pass1'][0]:.3f} ± {v['pass1'][1]:.3f} | {v['kl'][0]:.3f} ± {v['kl'][1]:.3f} | "
              f"{v['tokens'][0]:.2f} |")


def plot(summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, v in summary.items():
        for ax, key in zip(axes, ("kl", "tokens")):
            ax.errorbar(v[key][0], v["pass1"][0], xerr=v[key][1], yerr=v["pass1"][1], fmt="o", label=name)
    axes[0].set_xlabel("KL(decoder || pi_ref), nats per completion")
    axes[1].set_xlabel("generated tokens per completion")
    for ax in axes:
        ax.set_ylabel("held-out pass@1")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / f"qsharp_shipped{TAG}.png", dpi=120)


if __name__ == "__main__":
    main()
