"""Aggregate a finished compare grid into OUT/report.md, OUT/report.json and PNG plots.

Score of a run = its held-out ``metric`` after training (summary.json), averaged over the
(task, difficulty) cells of its task column. Per method the runs form a score matrix
[seeds, tasks]; ``tilt.evaluation.stats`` (rliable) turns those into IQM, optimality gap and
probability of improvement with stratified-bootstrap 95% CIs, and performance profiles
(Agarwal et al. 2021, arXiv:2108.13264). Only seeds whose runs finished on every task count.
"""
from __future__ import annotations

import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tilt.compare.runner import expand_grid, run_status
from tilt.compare.spec import CompareSpec


def run_score(summary: dict, metric: str, when: str = "after") -> float | None:
    """Held-out ``metric`` after (or before) training: mean over the run's cells, else the overall number.

    ``when="before"`` reads the evaluation of the untrained model; None if the summary has none.
    """
    heldout = summary["heldout"]
    cells = heldout.get("per_cell" if when == "after" else "per_cell_before") or {}
    if cells:
        return float(np.mean([cell[metric] for cell in cells.values()]))
    value = heldout.get(f"{metric}_{when}")
    if value is None and when == "after":
        raise KeyError(f"summary has no held-out {metric!r} score")
    return None if value is None else float(value)


def read_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> eval/<metric> from metrics.jsonl (a later line for the same step wins)."""
    curve: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if f"eval/{metric}" in row and row[f"eval/{metric}"] is not None:
                curve[int(row["step"])] = float(row[f"eval/{metric}"])
    return curve


@dataclass
class Collected:
    """Finished runs of a grid, shaped for the statistics."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [seeds, tasks]
    before: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [seeds, tasks], untrained model
    seeds: dict[str, list[int]] = field(default_factory=dict)  # method -> seeds with every task done
    curves: dict[str, tuple[list[int], np.ndarray]] = field(default_factory=dict)  # method -> (steps, [seeds, tasks, points])
    runs: list[dict] = field(default_factory=list)  # one row per finished run
    missing: list[str] = field(default_factory=list)  # runs not finished


def collect_runs(spec: CompareSpec, out_dir: Path) -> Collected:
    """Read summary.json, metrics.jsonl and seeds.json of every finished run of the grid."""
    out = Collected()
    by_key: dict[tuple[str, str, int], dict] = {}
    for run in expand_grid(spec, out_dir):
        if run_status(run.run_dir) != "done":
            out.missing.append(run.name)
            continue
        summary = json.loads((run.run_dir / "summary.json").read_text())
        seeds_path = run.run_dir / "seeds.json"
        row = {"name": run.name, "method": run.method, "task": run.task, "seed": run.seed,
               "score": run_score(summary, spec.metric), "before": run_score(summary, spec.metric, "before"),
               "config_hash": summary.get("config_hash"),
               "versions": summary.get("versions") or {},
               "seeds": json.loads(seeds_path.read_text()) if seeds_path.is_file() else None,
               "curve": read_curve(run.run_dir, spec.metric)}
        out.runs.append(row)
        by_key[(run.method, run.task, run.seed)] = row
    for method in spec.methods:
        seeds = [s for s in spec.seeds if all((method, t, s) in by_key for t in spec.tasks)]
        if not seeds:
            continue
        rows = [[by_key[(method, t, s)] for t in spec.tasks] for s in seeds]  # [seeds][tasks]
        out.seeds[method] = seeds
        out.scores[method] = np.array([[r["score"] for r in rr] for rr in rows])  # [seeds, tasks]
        if all(r["before"] is not None for rr in rows for r in rr):
            out.before[method] = np.array([[r["before"] for r in rr] for rr in rows])  # [seeds, tasks]
        steps = sorted(set.intersection(*(set(r["curve"]) for rr in rows for r in rr)))
        if steps:
            curve = np.array([[[r["curve"][k] for k in steps] for r in rr] for rr in rows])  # [seeds, tasks, points]
            out.curves[method] = (steps, curve)
    return out


def versions_here() -> dict[str, str]:
    """Versions of python, torch, transformers and tilt in the process writing the report."""
    out = {"python": platform.python_version()}
    for key, dist in (("torch", "torch"), ("transformers", "transformers"), ("tilt", "tilt-rl")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def seed_rows(runs: list[dict]) -> list[dict]:
    """Union over runs of the seeds.json ranges: one row per (split, task), plus train/eval overlap."""
    acc: dict[tuple[str, str], dict] = {}
    for run in runs:
        for split, tasks in (run["seeds"] or {}).items():
            if split == "dataset":  # a dataset run: see dataset_rows
                continue
            for task, r in tasks.items():
                row = acc.setdefault((split, task), {"split": split, "task": task, "min_seed": r["min_seed"],
                                                     "max_seed": r["max_seed"], "counts": set(), "runs": 0})
                row["min_seed"] = min(row["min_seed"], r["min_seed"])
                row["max_seed"] = max(row["max_seed"], r["max_seed"])
                row["counts"].add(r["count"])
                row["runs"] += 1
    rows = [dict(r, counts=sorted(r["counts"])) for _, r in sorted(acc.items())]
    for row in rows:
        if row["split"] == "eval":
            train = acc.get(("train", row["task"]))
            row["overlaps_train"] = bool(train and row["min_seed"] <= train["max_seed"] and train["min_seed"] <= row["max_seed"])
    return rows


def dataset_rows(runs: list[dict]) -> list[dict]:
    """One row per dataset run: its train / eval sources and how many eval prompts overlap train."""
    return [{"run": r["name"], **{k: r["seeds"]["dataset"].get(k) for k in
                                  ("train", "eval", "train_rows", "eval_rows", "eval_overlap_train", "allow_contaminated")}}
            for r in runs if r["seeds"] and "dataset" in r["seeds"]]


def _f(x: float) -> str:
    return f"{x:.3f}"


def _ci(iv: dict) -> str:
    return f"[{iv['low']:.3f}, {iv['high']:.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(spec: CompareSpec, col: Collected, res: dict, plots: list[str]) -> str:
    """report.md: aggregate tables, per-task means, plots, runs, seeds and versions."""
    st = res.get("stats")
    lines = [f"# tilt compare: {spec.name}", "",
             f"Score of a run: held-out **{spec.metric}** after training, averaged over the (task, difficulty) "
             "cells of its task column. Aggregates run over the score matrix [seeds x tasks] of each method "
             "with rliable (arXiv:2108.13264): IQM = 25% trimmed mean, optimality gap = 1 - mean(min(score, 1)).",
             ""]
    if st is None:
        return "\n".join(lines + ["No finished runs yet.", *_missing(col)]) + "\n"
    lines += [f"CIs: {int(st['confidence'] * 100)}% percentile intervals from {st['reps']} stratified bootstrap "
              f"resamples (seed {st['seed']}). Baseline: `{spec.baseline}`.", "", "## Aggregate", ""]
    lines += _table(["method", "runs (seeds x tasks)", "IQM", "95% CI", "optimality gap", "95% CI"], [
        [m, f"{len(col.seeds[m])} x {len(spec.tasks)}", _f(st["iqm"][m]["point"]), _ci(st["iqm"][m]),
         _f(st["optimality_gap"][m]["point"]), _ci(st["optimality_gap"][m])] for m in col.scores])
    lines += ["", f"## Probability of improvement over `{spec.baseline}`", ""]
    if st["improvement_vs_baseline"]:
        lines += _table(["method", f"P(method > {spec.baseline})", "95% CI"], [
            [m, _f(iv["point"]), _ci(iv)] for m, iv in st["improvement_vs_baseline"].items()])
    else:
        lines.append(f"Not available: the baseline `{spec.baseline}` has no finished seed, or it is the only method.")
    if st.get("change"):
        lines += ["", "## Before -> after training", "",
                  f"Held-out {spec.metric} of the untrained model (evaluated by each run at step 0 on the same items) "
                  "and after training; change = after - before per run, its mean over runs with a stratified-bootstrap "
                  "CI (paired: each run is compared with its own starting point).", ""]
        lines += _table(["method", "before (mean)", "after (mean)", "change (mean)", "95% CI", "CI excludes 0"], [
            [m, _f(float(col.before[m].mean())), _f(float(col.scores[m].mean())), _f(iv["point"]), _ci(iv),
             "yes" if iv["low"] > 0 or iv["high"] < 0 else "no"] for m, iv in st["change"].items()])
    lines += ["", "## Mean score per task (over seeds)", ""]
    lines += _table(["method", *spec.tasks], [[m, *map(_f, st["per_task_mean"][m])] for m in col.scores])
    lines += ["", "## Plots", "", *(f"![{p}]({p})" for p in plots), "", "## Runs", ""]
    lines += _table(["run", "method", "task", "seed", spec.metric, "config hash"], [
        [r["name"], r["method"], r["task"], str(r["seed"]), _f(r["score"]), str(r["config_hash"])] for r in col.runs])
    lines += ["", "## Seeds (contamination check, catalogue G3)", "",
              "Generator seeds each run trained and evaluated on (from seeds.json), combined over runs.", ""]
    seeds = res["seeds"]
    lines += _table(["split", "task", "seeds", "items per run", "runs", "eval overlaps train"], [
        [r["split"], r["task"], f"{r['min_seed']}..{r['max_seed']}", ", ".join(map(str, r["counts"])), str(r["runs"]),
         ("**YES**" if r["overlaps_train"] else "no") if r["split"] == "eval" else ""] for r in seeds])
    data_rows = dataset_rows(col.runs)
    if data_rows:
        lines += ["", "Dataset runs: eval prompts compared with train prompts by normalised-prompt hash.", ""]
        lines += _table(["run", "train", "eval", "train rows", "eval rows", "eval overlaps train"], [
            [r["run"], str(r["train"]), str(r["eval"]), str(r["train_rows"]), str(r["eval_rows"]),
             (f"**YES: {r['eval_overlap_train']} prompts (allowed)**" if r["eval_overlap_train"] else "no")]
            for r in data_rows])
    lines += ["", "## Versions", "", "Report written with: " + ", ".join(f"{k} {v}" for k, v in res["versions_here"].items()), ""]
    lines += _table(["runs", "versions"], [[str(n), v] for v, n in res["run_versions"].items()])
    return "\n".join(lines + _missing(col)) + "\n"


def _missing(col: Collected) -> list[str]:
    if not col.missing:
        return []
    return ["", "## Not finished (left out)", "", *(f"- {name}" for name in col.missing)]


def write_report(spec: CompareSpec, out_dir: str | Path, *, reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Write OUT/report.md, OUT/report.json and the PNG plots; return report.json's content."""
    from tilt.compare import plots
    from tilt.evaluation import stats

    out_dir = Path(out_dir)
    col = collect_runs(spec, out_dir)
    res: dict[str, Any] = {"name": spec.name, "metric": spec.metric, "tasks": spec.tasks, "seeds_used": col.seeds,
                           "missing": col.missing, "versions_here": versions_here(), "stats": None}
    res["run_versions"] = dict(Counter(json.dumps(r["versions"], sort_keys=True) for r in col.runs))
    res["seeds"] = seed_rows(col.runs)
    res["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in col.runs]
    written: list[str] = []
    if col.scores:
        baseline = spec.baseline if spec.baseline in col.scores else next(iter(col.scores))
        res["stats"] = stats.compare_methods(col.scores, baseline=baseline, reps=reps, seed=seed)
        if spec.baseline not in col.scores:
            res["stats"]["improvement_vs_baseline"] = {}
        if col.before:
            res["stats"]["change"] = {m: iv.to_dict() for m, iv in stats.change_intervals(
                col.before, {m: col.scores[m] for m in col.before}, reps=reps, seed=seed).items()}
            res["before"] = {m: s.tolist() for m, s in col.before.items()}
        res["scores"] = {m: s.tolist() for m, s in col.scores.items()}
        curves = {m: c for m, (_, c) in col.curves.items()}
        res["curves"] = {m: dict(steps=col.curves[m][0], **iv)
                         for m, iv in (stats.iqm_curves(curves, reps=reps, seed=seed) if curves else {}).items()}
        written = plots.write_plots(res, out_dir)
    (out_dir / "report.md").write_text(render_markdown(spec, col, res, written))
    (out_dir / "report.json").write_text(json.dumps(res, indent=1))
    return res
