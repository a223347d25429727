"""Held-out evaluation of a policy on items: greedy reward and sampled rewards.

pass@1 at T=1.0 is the mean reward over ``n_samples`` samples per prompt; greedy is the reward
of the argmax decode. Rewards come from the run's own reward functions, called with TRL's
arguments (tilt.rewards.score; default: the built-in verifier). Both are broken down per cell:
(task, difficulty) for built-in tasks, the values of ``data.eval.breakdown`` for a dataset.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tilt.rewards import RewardFn, RewardState, score, verifier_reward
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate, masked_rows
from tilt.tasks.base import Item


@dataclass
class ItemResult:
    item: Item
    sample_rewards: list[float] = field(default_factory=list)
    greedy_reward: float = 0.0


def cell_name(item: Item) -> str:
    """"task:difficulty" for a built-in task; the breakdown label alone for a dataset row (difficulty 0)."""
    return item.task if item.difficulty == 0 else f"{item.task}:{item.difficulty}"


def _rewards(items: list[Item], texts: list[str], completion_ids: list[list[int]], reward_fns: list[RewardFn],
             weights: list[float], timeout: float, state: Optional[RewardState]) -> list[float]:
    from tilt.wiring.sampling import row_columns

    prompts, columns = row_columns(items)
    return score(reward_fns, weights, prompts, texts, columns, timeout=timeout, completion_ids=completion_ids,
                 trainer_state=state)[0]


@torch.no_grad()
def evaluate_items(model, tokenizer, items: list[Item], *, n_samples: int = 8, temperature: float = 1.0,
                   max_new_tokens: int = 16, batch_size: int = 512, seed: int = 0,
                   reward_fns: Optional[list[RewardFn]] = None, weights: Optional[list[float]] = None,
                   timeout: float = 10.0, progress: Optional[Callable[[str], None]] = None,
                   trainer_state: Optional[RewardState] = None, decoding=None) -> list[ItemResult]:
    """Greedy decode once and sample ``n_samples`` per item; score with ``reward_fns`` (weighted
    sum; default the built-in verifier).

    ``decoding`` (a ``tilt.decoding.lm.Decoding``) replaces plain sampling for the ``n_samples``
    draws; None (or decoder "sample") is today's sampling, sample for sample.

    Sampling uses its own generator seeded by ``seed``, so evaluation does not disturb the
    training RNG streams and gives the same numbers for the same model. ``progress`` receives a
    line after each generation batch.
    """
    fns = reward_fns or [verifier_reward]
    w = weights or [1.0] * len(fns)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    results = [ItemResult(it) for it in items]
    jobs = [(i, 0.0) for i in range(len(items))] + [(i, temperature) for i in range(len(items))
                                                    for _ in range(n_samples)]
    special = not items or items[0].raw_prompt is None
    t0 = time.time()
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        for temp in sorted({t for _, t in chunk}):
            sub = [i for i, t in chunk if t == temp]
            ids, mask = encode_prompts(tokenizer, [items[i].prompt for i in sub], add_special_tokens=special)
            if decoding is not None and temp != 0.0:  # a registered decoder (tilt.decoding), e.g. Q-sharp
                batch = decoding.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad,
                                          generator=gen)[0]
            else:
                batch = generate(model, ids, mask, params=SamplingParams(max_new_tokens, temp), eos_id=eos,
                                 pad_id=pad, generator=gen)
            cids = masked_rows(batch.completion_ids, batch.completion_mask)
            rewards = _rewards([items[i] for i in sub], decode_completions(tokenizer, batch, eos), cids, fns, w,
                               timeout, trainer_state)
            for i, r in zip(sub, rewards):
                if temp == 0.0:
                    results[i].greedy_reward = r
                else:
                    results[i].sample_rewards.append(r)
        if progress is not None:
            done = min(start + batch_size, len(jobs))
            progress(f"eval: {done}/{len(jobs)} completions ({len(items)} prompts x (1 greedy + {n_samples} "
                     f"samples)), {time.time() - t0:.0f}s")
    return results


def summarize(results: list[ItemResult]) -> dict:
    """{"pass1": mean sampled reward, "greedy": mean greedy reward, "per_cell": {...}}."""
    cells: dict[str, list[ItemResult]] = {}
    for r in results:
        cells.setdefault(cell_name(r.item), []).append(r)

    def agg(rs: list[ItemResult]) -> dict[str, float]:
        p1 = sum(sum(r.sample_rewards) / max(len(r.sample_rewards), 1) for r in rs) / max(len(rs), 1)
        return {"pass1": p1, "greedy": sum(r.greedy_reward for r in rs) / max(len(rs), 1), "n": len(rs)}

    # Overall numbers weight every cell equally, so a mix is not dominated by its largest cell.
    per_cell = {k: agg(v) for k, v in sorted(cells.items())}
    n = max(len(per_cell), 1)
    return {"pass1": sum(c["pass1"] for c in per_cell.values()) / n,
            "greedy": sum(c["greedy"] for c in per_cell.values()) / n,
            "per_cell": per_cell}
