"""Train prompts in, scored groups of completions out.

``TrainStream`` reads the run's data source (tilt.data: built-in tasks or a dataset) in order
from a cursor, so a run that draws extra prompts (dynamic sampling) records its position in
the checkpoint and resumes exactly. Rewards are called with TRL's arguments (tilt.rewards).
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
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate, left_pad, masked_rows
from tilt.tasks.base import Item

ScoreFn = Callable[..., tuple[list[float], dict[str, float], list[str]]]  # (prompts, texts, columns, **kw)


class TrainStream:
    """The run's train prompts in order: stream item j is item ``offset + j`` of the source's
    train stream. ``source`` is a tilt.data source, or a task-mix string (built-in tasks)."""

    def __init__(self, source, *, offset: int, pos: int = 0):
        if isinstance(source, str):
            from tilt.data.sources import TaskSource

            source = TaskSource(source)
        self.source, self.offset, self.pos = source, offset, pos

    def take(self, n: int) -> list[Item]:
        """The next ``n`` items; advances the cursor ``pos``."""
        items = self.source.train_items(self.offset + self.pos, n)
        self.pos += n
        return items


@dataclass
class Scored:
    """B prompts x G completions (N = B*G rows, group-major), sampled and scored."""

    items: list[Item]  # [B]
    group_size: int
    prompts: list[Any]  # [N] as the source holds them: strings, or message lists (reward functions' input)
    rb: RolloutBatch  # [N, ...]
    texts: list[str]  # [N] completions, EOS stripped
    columns: dict[str, list[Any]]  # [N] per column: the rows' non-prompt columns (Item.reward_columns)
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
    """Sample G completions per item with the policy (eval mode) and score them with TRL's
    arguments: raw prompts, decoded completions, completion ids (EOS kept) and the row columns."""
    G = group_size
    ids, mask = encode_prompts(policy.tokenizer, [it.prompt for it in items for _ in range(G)],
                               add_special_tokens=items[0].raw_prompt is None)  # [N, P]; a chat template adds its own
    policy.model.eval()
    rb = generate(policy.model, ids, mask, params=params, eos_id=policy.eos_id, pad_id=policy.pad_id,
                  generator=generator)
    policy.model.train()
    texts = decode_completions(policy.tokenizer, rb, policy.eos_id)
    prompts, columns = row_columns(items, G)
    completion_ids = masked_rows(rb.completion_ids, rb.completion_mask)
    rewards, rstats, messages = score_fn(prompts, texts, columns, completion_ids=completion_ids)
    r = torch.tensor(rewards, dtype=torch.float32)  # [N]
    return Scored(list(items), G, prompts, rb, texts, columns, r, rstats, messages)


def row_columns(items: list[Item], repeat: int = 1) -> tuple[list[Any], dict[str, list[Any]]]:
    """(prompts [N], {column: [N] values}) of ``items``, each repeated ``repeat`` times in a row:
    TRL's ``reward_kwargs`` (the columns of the first row; every row of a source has the same)."""
    prompts = [it.prompt_value for it in items for _ in range(repeat)]
    rows = [it.reward_columns() for it in items]
    return prompts, {k: [row.get(k) for row in rows for _ in range(repeat)] for k in rows[0]}


def merge_scored(groups: list[Scored], *, pad_id: int) -> Scored:
    """One batch from groups of possibly different widths: prompts re-left-padded, completions
    re-right-padded (pad id, mask 0, log-prob 0). Counts and messages are left empty."""
    G = groups[0].group_size
    p_rows = [r for g in groups for r in masked_rows(g.rb.prompt_ids, g.rb.prompt_mask)]
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
