"""Task mixes and the seeded train / eval item streams (catalogue G3).

A mix string such as ``"addition:1-2,countdown:1|3@2.0"`` names (task, difficulty) cells
with sampling weights. Item j of a split uses generator seed ``SEED_RANGES[split][0] + j``,
so train and eval items come from disjoint seed ranges, and ``seed_report`` records which
seeds a run trained and evaluated on.
"""
from __future__ import annotations

import math
import random
from typing import Union

from tilt.tasks import TASKS, get_task
from tilt.tasks.base import SEED_RANGES, Item

Cell = tuple[str, int, float]  # (task, difficulty, weight)
Mix = Union[str, list[Cell]]

# Fixed order of eval seed blocks: append new tasks at the END so existing eval sets never move.
EVAL_BLOCK_ORDER = ("addition", "multiplication", "countdown", "sorting", "addition_steps", "rg_chain_sum", "code_mul")
EVAL_BLOCK = 1_000_000  # seeds per (task, difficulty) eval block; also the per_cell maximum
MAX_DIFFICULTY = 10  # eval blocks reserved per task


def _parse_difficulties(task: str, text: str, entry: str) -> list[int]:
    """ "2" -> [2], "1-3" -> [1, 2, 3], "1|3" -> [1, 3] (pieces may be ranges: "1-2|3")."""
    valid = TASKS.entry(task).meta["difficulties"]
    out: list[int] = []
    try:
        for piece in text.split("|"):
            lo, dash, hi = piece.partition("-")
            lo_i, hi_i = int(lo), int(hi if dash else lo)
            if not (lo_i in valid and hi_i in valid and lo_i <= hi_i):
                raise ValueError
            out.extend(range(lo_i, hi_i + 1))
    except ValueError:
        out = []
    if not out or any(d not in valid for d in out):
        raise ValueError(f"bad difficulty {text!r} in mix entry {entry!r}; valid difficulties "
                         f"of {task}: {', '.join(map(str, valid))} (write e.g. 2, 1-3 or 1|3)")
    return out


def parse_mix(spec: str) -> list[Cell]:
    """Parse ``"task:difficulties[@weight],..."`` into one (task, difficulty, weight) per cell.

    The weight (default 1.0) applies to each cell of the entry. Raises ValueError naming the
    bad piece and listing valid tasks or difficulties; a cell may appear only once.
    """
    cells: list[Cell] = []
    valid_tasks = ", ".join(TASKS.names())
    for entry in (e.strip() for e in spec.split(",")):
        body, at, weight_text = entry.partition("@")
        task, colon, diffs = (s.strip() for s in body.partition(":"))
        if not colon or not task or not diffs:
            raise ValueError(f"bad mix entry {entry!r}: expected task:difficulties[@weight], "
                             f"e.g. addition:1-2 ; valid tasks: {valid_tasks}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in mix entry {entry!r}; valid tasks: {valid_tasks}")
        try:
            weight = float(weight_text) if at else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"bad weight {weight_text!r} in mix entry {entry!r}: "
                             "must be a positive finite number")
        for d in _parse_difficulties(task, diffs, entry):
            if any((task, d) == (t, dd) for t, dd, _ in cells):
                raise ValueError(f"cell {task}:{d} appears twice in mix {spec!r}")
            cells.append((task, d, weight))
    return cells


def _cells(mix: Mix) -> list[Cell]:
    """A mix string parsed, or an already-parsed list checked the same way."""
    if isinstance(mix, str):
        return parse_mix(mix)
    return parse_mix(",".join(f"{task}:{d}@{float(w)!r}" for task, d, w in mix))


def _seed_start(split: str) -> tuple[int, int]:
    if split not in SEED_RANGES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SEED_RANGES)}")
    return SEED_RANGES[split]


def sample_items(mix: Mix, *, split: str, start: int, count: int) -> list[Item]:
    """Items ``start .. start+count-1`` of ``split``, in order. Item j's cell is drawn by
    weight with ``random.Random(f"mix:{split}:{j}")``; its generator seed is
    ``SEED_RANGES[split][0] + j`` (ValueError if that leaves the split's range)."""
    cells = _cells(mix)
    lo, hi = _seed_start(split)
    if start < 0 or count < 0 or lo + start + count > hi:
        raise ValueError(f"items {start}..{start + count - 1} leave the {split} seed range "
                         f"[{lo}, {hi}) ({hi - lo} items)")
    weights = [w for _, _, w in cells]
    items = []
    for j in range(start, start + count):
        task, difficulty, _ = random.Random(f"mix:{split}:{j}").choices(cells, weights)[0]
        items.append(get_task(task).generate(lo + j, difficulty))
    return items


def eval_seed(task: str, difficulty: int, k: int) -> int:
    """Generator seed of the k-th held-out item of a cell: a fixed block per cell, so a
    cell's items never depend on which other cells are in the mix."""
    if task not in EVAL_BLOCK_ORDER:
        raise ValueError(f"task {task!r} has no eval seed block; append it to EVAL_BLOCK_ORDER "
                         f"(now: {', '.join(EVAL_BLOCK_ORDER)})")
    if not (1 <= difficulty <= MAX_DIFFICULTY and 0 <= k < EVAL_BLOCK):
        raise ValueError(f"need 1 <= difficulty <= {MAX_DIFFICULTY} and 0 <= k < {EVAL_BLOCK}, "
                         f"got difficulty={difficulty}, k={k}")
    cell_index = EVAL_BLOCK_ORDER.index(task) * MAX_DIFFICULTY + (difficulty - 1)
    return SEED_RANGES["eval"][0] + EVAL_BLOCK * cell_index + k


def eval_items(mix: Mix, *, per_cell: int) -> list[Item]:
    """The held-out set: ``per_cell`` items per (task, difficulty) cell of ``mix``, in mix
    order, with seeds from ``eval_seed`` (weights are ignored)."""
    if not 0 <= per_cell <= EVAL_BLOCK:
        raise ValueError(f"per_cell must be in [0, {EVAL_BLOCK}], got {per_cell}")
    items = []
    for task, difficulty, _ in _cells(mix):
        generate = get_task(task).generate
        items += [generate(eval_seed(task, difficulty, k), difficulty) for k in range(per_cell)]
    return items


def split_of_seed(seed: int) -> str:
    """The split whose seed range holds ``seed``."""
    for split, (lo, hi) in SEED_RANGES.items():
        if lo <= seed < hi:
            return split
    raise ValueError(f"seed {seed} lies in no split range {SEED_RANGES}")


def seed_report(items: list[Item]) -> dict:
    """``{split: {task: {"min_seed", "max_seed", "count", "difficulties"}}}`` over ``items``;
    JSON-serialisable, written by a run to record what it trained and evaluated on."""
    report: dict[str, dict[str, dict]] = {}
    for item in items:
        row = report.setdefault(split_of_seed(item.seed), {}).setdefault(
            item.task, {"min_seed": item.seed, "max_seed": item.seed, "count": 0, "difficulties": []})
        row["min_seed"] = min(row["min_seed"], item.seed)
        row["max_seed"] = max(row["max_seed"], item.seed)
        row["count"] += 1
        if item.difficulty not in row["difficulties"]:
            row["difficulties"] = sorted(row["difficulties"] + [item.difficulty])
    return report
