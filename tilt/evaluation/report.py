"""The held-out evaluation table and the contamination check (catalogue G2, G3).

``build_eval_report`` turns per-item results of ``tilt.evaluate.evaluate_items`` into a
JSON-serialisable table: greedy accuracy and unbiased pass@k per (task, difficulty) cell,
per task and overall. ``check_seed_overlap`` lists evaluation items whose generator seed lies
in a range the run (or the shipped base model) trained on, so the CLI can refuse to report
a contaminated number (Reasoning or Memorization?, arXiv:2507.10532).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from tilt.evaluation.passk import count_correct, pass_at_k
from tilt.tasks.base import SEED_RANGES, Item
from tilt.tasks.mix import seed_report


class ItemResult(Protocol):
    """What ``evaluate_items`` returns per item."""

    item: Item
    sample_rewards: list[float]
    greedy_reward: float


def cell_key(task: str, difficulty: int) -> str:
    """The name of a (task, difficulty) cell, as in summary.json: "addition:1"; a dataset row
    (difficulty 0) is named by its label alone ("data", or "level=2" with data.eval.breakdown)."""
    return task if difficulty == 0 else f"{task}:{difficulty}"


def _row(label: str, task: str | None, difficulty: int | None, results: list[ItemResult], ks: Sequence[int], threshold: float) -> dict:
    """Metrics of one table row: means over the row's items."""
    n = np.array([len(r.sample_rewards) for r in results], dtype=np.int64)  # [P]
    c = np.array([count_correct(r.sample_rewards, threshold=threshold) for r in results], dtype=np.int64)  # [P]
    greedy = np.array([r.greedy_reward >= threshold for r in results], dtype=np.float64)  # [P]
    row: dict[str, Any] = {
        "cell": label,
        "task": task,
        "difficulty": difficulty,
        "n_items": len(results),
        "n_samples": int(n.min()) if len(results) else 0,
        "greedy": float(greedy.mean()),
        "mean_reward": float(np.mean([np.mean(r.sample_rewards) for r in results])),
    }
    for k in ks:
        row[f"pass{k}"] = float(pass_at_k(n, c, k=k).mean())
    return row


def build_eval_report(
    results: Iterable[ItemResult],
    *,
    ks: Sequence[int] = (1,),
    threshold: float = 1.0,
    contaminated: bool = False,
    seeds: Mapping[str, Any] | None = None,
) -> dict:
    """The evaluation table: greedy accuracy and pass@k per cell, per task and overall.

    Args:
        results: per-item results (``item``, ``sample_rewards``, ``greedy_reward``).
        ks: the k of each pass@k column; every item needs at least max(ks) samples.
        threshold: a reward >= threshold counts as correct (greedy and sampled alike).
        contaminated: carried through unchanged; set when ``check_seed_overlap`` found items.
        seeds: the run's seeds.json content, if any, recorded as "train_seeds".
    Returns:
        {"rows": [...], "per_cell": {cell: {"greedy", "pass<k>"...}}, "ks", "threshold",
        "contaminated", "eval_seeds" (``seed_report`` of the items), "train_seeds"}. Rows are
        micro-averages over items: cells first, then one row per task, then "all".
    Reference: pass@k, Eq. 1, arXiv:2107.03374.
    """
    results = list(results)
    if not results:
        raise ValueError("no evaluation results to report")
    for r in results:
        if any(len(r.sample_rewards) < k for k in ks):
            raise ValueError(f"pass@{max(ks)} needs >= {max(ks)} samples per item; item "
                             f"{cell_key(r.item.task, r.item.difficulty)} seed {r.item.seed} has {len(r.sample_rewards)}")
    by_cell: dict[tuple[str, int], list[ItemResult]] = defaultdict(list)
    for r in results:
        by_cell[(r.item.task, r.item.difficulty)].append(r)
    rows = [_row(cell_key(t, d), t, d, by_cell[(t, d)], ks, threshold) for t, d in sorted(by_cell)]
    for task in sorted({t for t, d in by_cell if d != 0}):  # dataset cells have no per-task row
        rows.append(_row(task, task, None, [r for r in results if r.item.task == task], ks, threshold))
    rows.append(_row("all", None, None, results, ks, threshold))
    metric_keys = ["greedy", *(f"pass{k}" for k in ks)]
    return {
        "rows": rows,
        "per_cell": {row["cell"]: {m: row[m] for m in metric_keys} for row in rows if row["difficulty"] is not None},
        "ks": list(ks),
        "threshold": threshold,
        "contaminated": bool(contaminated),
        "eval_seeds": seed_report([r.item for r in results if r.item.fields is None]),
        "train_seeds": dict(seeds) if seeds is not None else None,
    }


def render_eval_table(report: Mapping[str, Any]):
    """A ``rich.table.Table`` of ``build_eval_report``'s rows (print it with a rich Console)."""
    from rich.table import Table

    title = "held-out evaluation"
    if report["contaminated"]:
        title += " [bold red](CONTAMINATED: some items share seeds with training)[/]"
    table = Table(title=title)
    for name in ("cell", "items", "samples", "greedy", *(f"pass@{k}" for k in report["ks"])):
        table.add_column(name, justify="left" if name == "cell" else "right")
    for row in report["rows"]:
        style = "bold" if row["difficulty"] is None else None
        values = [f"{row['greedy']:.3f}", *(f"{row[f'pass{k}']:.3f}" for k in report["ks"])]
        table.add_row(row["cell"], str(row["n_items"]), str(row["n_samples"]), *values, style=style)
    ranges = [f"{split}/{task} {r['min_seed']}..{r['max_seed']}"
              for split, tasks in report["eval_seeds"].items() for task, r in tasks.items()]
    where = f"evaluated seeds: {'; '.join(ranges)}" if ranges else f"evaluated rows of {report.get('dataset', {}).get('eval', 'a dataset')}"
    table.caption = f"{where}. correct = reward >= {report['threshold']}"
    return table


def seed_ranges(spec: Any) -> list[tuple[str | None, int, int]]:
    """Parse seed ranges into [(task or None, start, stop)] half-open intervals.

    Accepts a [start, stop] pair, {"start": a, "stop": b}, {"min_seed": a, "max_seed": b}
    (inclusive, as ``tilt.tasks.mix.seed_report`` writes), a list of those, or
    {task_name: any of those} for per-task ranges.
    """
    if isinstance(spec, Mapping):
        if "start" in spec and "stop" in spec:
            return [(None, int(spec["start"]), int(spec["stop"]))]
        if "min_seed" in spec and "max_seed" in spec:
            return [(None, int(spec["min_seed"]), int(spec["max_seed"]) + 1)]
        out = []
        for task, sub in spec.items():
            out += [(str(task), a, b) for _, a, b in seed_ranges(sub)]
        return out
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) == 2 and all(isinstance(v, (int, np.integer)) for v in spec):
            return [(None, int(spec[0]), int(spec[1]))]
        return [r for sub in spec for r in seed_ranges(sub)]
    raise ValueError(f"cannot read a seed range from {spec!r}: expected [start, stop], "
                     "{'start': a, 'stop': b}, {'min_seed': a, 'max_seed': b}, a list of those, or {task: range}")


def check_seed_overlap(
    train_seeds_json: str | Path | Mapping[str, Any], eval_items: Iterable[Item], *, include_sft: bool = True
) -> list[str]:
    """Evaluation items whose generator seed lies in a range that was trained on.

    Args:
        train_seeds_json: path to a run's seeds.json, or its parsed content
            ({"train": ranges, "eval": ranges}; a bare ranges value is read as "train").
        eval_items: the items about to be evaluated.
        include_sft: also flag seeds in SEED_RANGES["sft"], which built the shipped base model.
    Returns:
        One human-readable problem per offending item; empty when evaluation is clean.
    Reference: held-out seeds against contamination, arXiv:2507.10532.
    """
    data = json.loads(Path(train_seeds_json).read_text()) if isinstance(train_seeds_json, (str, Path)) else train_seeds_json
    train = data["train"] if isinstance(data, Mapping) and "train" in data else data
    ranges = [(task, a, b, "this run's RL training") for task, a, b in seed_ranges(train)]
    if include_sft:
        ranges.append((None, *SEED_RANGES["sft"], "the SFT data of the shipped base model"))
    problems = []
    for item in eval_items:
        for task, start, stop, what in ranges:
            if (task is None or task == item.task) and start <= item.seed < stop:
                problems.append(f"item {cell_key(item.task, item.difficulty)} seed {item.seed} lies in "
                                f"[{start}, {stop}), the seed range of {what}")
                break
    return problems
