"""The decoder picture of `tilt eval --decoders`: for a set of decoders on one model, held-out pass@1
against KL(decoder || pi_ref) and against generated tokens per prompt (table + two-panel PNG).

KL is estimated from the decoder's own samples y ~ q (docs/metrics.md, ``decoders/kl``):
    KL(q || pi_ref) ≈ mean over completions of sum_t [log q(y_t | x, y_<t) − log pi_ref(y_t | x, y_<t)],
with both log-probs read from the same logits at generation time, so plain sampling at temperature 1
(q = pi_ref) gives exactly 0. Sequence and search decoders (best_of_n, resample, q_search) have no
tractable log q and report no KL.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import torch

from tilt.evaluate import ItemResult, _rewards, summarize
from tilt.rollout import decode_completions, encode_prompts

COLUMNS = ("decoder", "pass1", "kl", "kl_per_token", "tokens_per_prompt", "kept_tokens_per_prompt", "completions")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_decoders(spec: str) -> list[tuple[str, str, dict]]:
    """"sample,top_k:k=5,qsharp:beta=0.5,top_k=20" -> [(label, name, kwargs), ...].

    A comma-separated piece with ":" or without "=" starts a decoder; a "key=value" piece adds a kwarg
    to the decoder before it. Values are JSON (5, 0.5, true, [1, 2]) or else strings."""
    out: list[tuple[str, str, dict]] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        if ":" in piece or "=" not in piece:
            name, _, rest = piece.partition(":")
            out.append((piece, name.strip(), {}))
            pairs = [rest] if rest else []
        else:
            if not out:
                raise ValueError(f"--decoders {spec!r}: kwarg {piece!r} comes before any decoder name")
            label, name, _ = out[-1]
            out[-1] = (f"{label},{piece}", name, out[-1][2])
            pairs = [piece]
        for pair in pairs:
            key, eq, val = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--decoders {spec!r}: {pair!r} is not key=value")
            out[-1][2][key.strip()] = _value(val.strip())
    if not out:
        raise ValueError(f"--decoders {spec!r} names no decoder; e.g. sample,greedy,top_k:k=5")
    return out


@torch.no_grad()
def decoder_point(model, tokenizer, items, decoding, *, n: int, max_new_tokens: int, batch_size: int, seed: int,
                  reward_fns, weights, timeout: float, add_special_tokens: bool = True) -> dict[str, Any]:
    """pass@1 over ``n`` samples per item, the KL estimate and tokens per prompt of one decoder.

    Rows are items repeated n times ([item0 x n, item1 x n, ...]) in batches of ``batch_size``, drawn with
    a generator seeded by ``seed``."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    rows = [i for i in range(len(items)) for _ in range(n)]
    results = [ItemResult(it) for it in items]
    kl, kl_tokens, kept, has_kl = 0.0, 0, 0, True
    before = decoding.generated_tokens
    for start in range(0, len(rows), batch_size):
        sub = rows[start:start + batch_size]
        ids, mask = encode_prompts(tokenizer, [items[i].prompt for i in sub], add_special_tokens=add_special_tokens)
        batch, ref = decoding.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad,
                                       generator=gen, with_ref=True)
        m = batch.completion_mask.bool()  # [N, T]
        kept += int(m.sum())
        if ref is None:
            has_kl = False
        else:
            kl += float(torch.where(m, batch.logprobs - ref, torch.zeros_like(ref)).sum())  # sum_t log q - log pi_ref
            kl_tokens += int(m.sum())
        cids = [r[k].tolist() for r, k in zip(batch.completion_ids, m)]
        rewards = _rewards([items[i] for i in sub], decode_completions(tokenizer, batch, eos), cids, reward_fns,
                           weights, timeout, None)
        for i, r in zip(sub, rewards):
            results[i].sample_rewards.append(r)
    count = max(len(rows), 1)
    summary = summarize(results)
    return {"pass1": summary["pass1"], "kl": kl / count if has_kl else None,
            "kl_per_token": kl / max(kl_tokens, 1) if has_kl else None,
            "tokens_per_prompt": (decoding.generated_tokens - before) / count, "kept_tokens_per_prompt": kept / count,
            "completions": len(rows), "per_cell": {c: v["pass1"] for c, v in summary["per_cell"].items()}}


def write_frontier(rows: list[dict], out_dir: Path, *, title: str = "") -> dict[str, Path]:
    """decoders.json, decoders.csv and decoders.png (two panels) in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "decoders.json", "csv": out_dir / "decoders.csv", "png": out_dir / "decoders.png"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot_frontier(rows, paths["png"], title=title)
    return paths


def plot_frontier(rows: list[dict], path: Path, *, title: str = "") -> None:
    """Left: pass@1 vs KL(decoder || pi_ref) (decoders without a KL estimate left out, named in the
    caption); right: pass@1 vs generated tokens per prompt (discarded candidates included)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        for ax, key in zip(axes, ("kl", "tokens_per_prompt")):
            if r[key] is not None:
                label = r["decoder"] if key == "tokens_per_prompt" else None  # one legend, right panel
                ax.plot(r[key], r["pass1"], "o", color=color, label=label)
                ax.annotate(r["decoder"], (r[key], r["pass1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    no_kl = [r["decoder"] for r in rows if r["kl"] is None]
    axes[0].set(xlabel="KL(decoder || pi_ref), nats per completion", ylabel="held-out pass@1", title="accuracy vs KL")
    axes[1].set(xlabel="generated tokens per prompt (discarded candidates included)", ylabel="held-out pass@1",
                title="accuracy vs tokens")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.margins(x=0.2, y=0.1)
    if title:
        fig.suptitle(title, fontsize=9)
    if no_kl:
        fig.text(0.01, 0.01, "no KL estimate (log q intractable): " + "; ".join(no_kl), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if no_kl else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_frontier(rows: list[dict]) -> str:
    """A plain-text table of the rows."""
    def fmt(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    w = max([len("decoder")] + [len(r["decoder"]) for r in rows])
    lines = [f"{'decoder':<{w}} {'pass@1':>8} {'KL':>8} {'KL/tok':>8} {'tok/prompt':>10}"]
    for r in rows:
        lines.append(f"{r['decoder']:<{w}} {fmt(r['pass1']):>8} {fmt(r['kl']):>8} {fmt(r['kl_per_token']):>8} "
                     f"{r['tokens_per_prompt']:>10.2f}")
    return "\n".join(lines)


def run_frontier(pol, items, *, spec: str, value_model: Optional[str], n: int, max_new_tokens: int, batch_size: int,
                 seed: int, reward_fns, weights, timeout: float, out_dir: Path, log=print) -> tuple[list[dict], dict]:
    """Evaluate every decoder of ``spec`` (see ``parse_decoders``) on ``items`` and write the picture.

    Every decoder is built (and its kwargs checked) before any generation; ``value_model`` goes to
    the decoders that need one. Each decoder draws with a generator seeded by ``seed``."""
    from tilt.decoding import DECODERS
    from tilt.decoding.lm import Decoding

    if n < 1:
        raise ValueError(f"--n must be >= 1 samples per prompt for --decoders, got {n}")
    built = []
    for label, name, kwargs in parse_decoders(spec):
        needs = "values" in DECODERS.entry(name).meta["needs"]  # unknown name -> error listing the valid ones
        built.append((label, name, kwargs, Decoding.build(name, kwargs, value_model=value_model if needs else None,
                                                          model=pol.model, tokenizer=pol.tokenizer)))
    special = not items or items[0].raw_prompt is None
    rows = []
    for label, name, kwargs, dec in built:
        point = decoder_point(pol.model, pol.tokenizer, items, dec, n=n, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, seed=seed, reward_fns=reward_fns, weights=weights,
                              timeout=timeout, add_special_tokens=special)
        rows.append({"decoder": label, "name": name, "kwargs": kwargs, **point})
        log(f"decoder {label}: pass@1 {point['pass1']:.4f}, KL {point['kl']}, "
            f"tokens/prompt {point['tokens_per_prompt']:.2f}")
    paths = write_frontier(rows, out_dir, title=f"{len(items)} prompts x {n} samples")
    return rows, paths
