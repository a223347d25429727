"""Held-out evaluation of a policy on task items: greedy accuracy and sampled rewards.

pass@1 at T=1.0 is the mean reward over ``n_samples`` samples per prompt; greedy is the reward
of the argmax decode. Both are broken down per (task, difficulty) cell.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tilt.rewards import verifier_reward
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate
from tilt.tasks.base import Item


@dataclass
class ItemResult:
    item: Item
    sample_rewards: list[float] = field(default_factory=list)
    greedy_reward: float = 0.0


def _rewards(items: list[Item], texts: list[str]) -> list[float]:
    return verifier_reward([it.prompt for it in items], texts, task=[it.task for it in items],
                           columns=[it.columns for it in items])


@torch.no_grad()
def evaluate_items(model, tokenizer, items: list[Item], *, n_samples: int = 8, temperature: float = 1.0,
                   max_new_tokens: int = 16, batch_size: int = 512, seed: int = 0,
                   decoding=None) -> list[ItemResult]:
    """Greedy decode once and sample ``n_samples`` per item; score with the task verifiers.

    ``decoding`` (a ``tilt.decoding.lm.Decoding``) replaces plain sampling for the ``n_samples``
    draws; None (or decoder "sample") is today's sampling, sample for sample.

    Sampling uses its own generator seeded by ``seed``, so evaluation does not disturb the
    training RNG streams and gives the same numbers for the same model.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    results = [ItemResult(it) for it in items]
    jobs = [(i, 0.0) for i in range(len(items))] + [(i, temperature) for i in range(len(items))
                                                    for _ in range(n_samples)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        for temp in sorted({t for _, t in chunk}):
            sub = [i for i, t in chunk if t == temp]
            ids, mask = encode_prompts(tokenizer, [items[i].prompt for i in sub])
            if decoding is not None and temp != 0.0:
                batch = decoding.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad,
                                          generator=gen)[0]
            else:
                batch = generate(model, ids, mask, params=SamplingParams(max_new_tokens, temp), eos_id=eos,
                                 pad_id=pad, generator=gen)
            rewards = _rewards([items[i] for i in sub], decode_completions(tokenizer, batch, eos))
            for i, r in zip(sub, rewards):
                if temp == 0.0:
                    results[i].greedy_reward = r
                else:
                    results[i].sample_rewards.append(r)
    return results


def summarize(results: list[ItemResult]) -> dict:
    """{"pass1": mean sampled reward, "greedy": mean greedy reward, "per_cell": {...}}."""
    cells: dict[str, list[ItemResult]] = {}
    for r in results:
        cells.setdefault(f"{r.item.task}:{r.item.difficulty}", []).append(r)

    def agg(rs: list[ItemResult]) -> dict[str, float]:
        p1 = sum(sum(r.sample_rewards) / max(len(r.sample_rewards), 1) for r in rs) / max(len(rs), 1)
        return {"pass1": p1, "greedy": sum(r.greedy_reward for r in rs) / max(len(rs), 1), "n": len(rs)}

    # Overall numbers weight every cell equally, so a mix is not dominated by its largest cell.
    per_cell = {k: agg(v) for k, v in sorted(cells.items())}
    n = max(len(per_cell), 1)
    return {"pass1": sum(c["pass1"] for c in per_cell.values()) / n,
            "greedy": sum(c["greedy"] for c in per_cell.values()) / n,
            "per_cell": per_cell}
