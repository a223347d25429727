"""Train prompts in, scored groups of completions out.

``TrainStream`` reads the train split in order from a cursor, so a run that draws extra
prompts (dynamic sampling) records its position in the checkpoint and resumes exactly.
``Scored`` holds B prompts x G completions with their rewards; ``merge_scored`` re-pads
groups from different draws into one batch (DAPO dynamic sampling,
``tilt.selection.dynamic_sampling.draw_informative_groups``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from tilt.batch import RolloutBatch
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate, left_pad
from tilt.tasks.base import Item
from tilt.tasks.mix import parse_mix, sample_items

ScoreFn = Callable[[list[str], list[str], dict[str, list[Any]]], tuple[list[float], dict[str, float], list[str]]]


class TrainStream:
    """The run's train prompts in order: stream item j is item ``offset + j`` of the train split."""

    def __init__(self, mix: str, *, offset: int, pos: int = 0):
        self.cells, self.offset, self.pos = parse_mix(mix), offset, pos

    def take(self, n: int) -> list[Item]:
        """The next ``n`` items; advances the cursor ``pos``."""
        items = sample_items(self.cells, split="train", start=self.offset + self.pos, count=n)
        self.pos += n
        return items


@dataclass
class Scored:
    """B prompts x G completions (N = B*G rows, group-major), sampled and scored."""

    items: list[Item]  # [B]
    group_size: int
    prompts: list[str]  # [N]
    rb: RolloutBatch  # [N, ...]
    texts: list[str]  # [N] completions, EOS stripped
    columns: dict[str, list[Any]]  # reward-function columns, one entry per row
    rewards: Tensor  # [N] float32
    rstats: dict[str, float]  # reward error / timeout counts
    messages: list[str]

    def group(self, i: int) -> "Scored":
        """The G rows of group ``i`` (widths unchanged; counts and messages left to the caller)."""
        G = self.group_size
        rows = slice(i * G, (i + 1) * G)
        rb = RolloutBatch(**{f.name: getattr(self.rb, f.name)[rows] for f in fields(self.rb)})
        return Scored([self.items[i]], G, self.prompts[rows], rb, self.texts[rows],
                      {k: v[rows] for k, v in self.columns.items()}, self.rewards[rows], {}, [])


def sample_scored(policy, items: list[Item], *, group_size: int, params: SamplingParams,
                  generator: torch.Generator, score_fn: ScoreFn) -> Scored:
    """Sample G completions per item with the policy (eval mode) and score them."""
    G = group_size
    prompts = [it.prompt for it in items for _ in range(G)]
    ids, mask = encode_prompts(policy.tokenizer, prompts)  # [N, P]
    policy.model.eval()
    rb = generate(policy.model, ids, mask, params=params, eos_id=policy.eos_id, pad_id=policy.pad_id,
                  generator=generator)
    policy.model.train()
    texts = decode_completions(policy.tokenizer, rb, policy.eos_id)
    columns = {"task": [it.task for it in items for _ in range(G)],
               "difficulty": [it.difficulty for it in items for _ in range(G)],
               "columns": [it.columns for it in items for _ in range(G)]}
    rewards, rstats, messages = score_fn(prompts, texts, columns)
    r = torch.tensor(rewards, dtype=torch.float32)  # [N]
    return Scored(list(items), G, prompts, rb, texts, columns, r, rstats, messages)


def merge_scored(groups: list[Scored], *, pad_id: int) -> Scored:
    """One batch from groups of possibly different widths: prompts re-left-padded, completions
    re-right-padded (pad id, mask 0, log-prob 0). Counts and messages are left empty."""
    G = groups[0].group_size
    p_rows = [ids[m.bool()].tolist() for g in groups for ids, m in zip(g.rb.prompt_ids, g.rb.prompt_mask)]
    prompt_ids, prompt_mask = left_pad(p_rows, pad_id)  # [N, P]
    T = max(int(g.rb.completion_mask.sum(-1).max()) for g in groups)

    def right(x: Tensor, fill: float) -> Tensor:  # [n, t] -> [n, T]
        x = x[:, :T]
        return torch.cat([x, torch.full((x.shape[0], T - x.shape[1]), fill, dtype=x.dtype)], 1)

    rb = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                      completion_ids=torch.cat([right(g.rb.completion_ids, pad_id) for g in groups]),
                      completion_mask=torch.cat([right(g.rb.completion_mask, 0) for g in groups]),
                      logprobs=torch.cat([right(g.rb.logprobs, 0.0) for g in groups]))
    columns = {k: [v for g in groups for v in g.columns[k]] for k in groups[0].columns}
    return Scored([it for g in groups for it in g.items], G, [p for g in groups for p in g.prompts], rb,
                  [t for g in groups for t in g.texts], columns, torch.cat([g.rewards for g in groups]), {}, [])
