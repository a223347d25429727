"""`tilt eval`: load a run's final model (or any model), score held-out items, refuse contamination.

Items come from the run's data source (tilt.data: the built-in tasks of tasks.mix, or a
dataset's held-out rows) and are scored with the run's own reward functions (or ``--reward``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Console

from tilt.config import Config, load_config
from tilt.data import EVAL_SEED_OFFSET, RowSource, build_source, data_offset
from tilt.data.sources import eval_only_source
from tilt.decoding.lm import decoding_from_config
from tilt.evaluate import evaluate_items
from tilt.evaluation.report import build_eval_report, check_seed_overlap, render_eval_table
from tilt.model import load_policy
from tilt.models.prompting import formatted
from tilt.rewards import check_signature, resolve_reward_fn
from tilt.tasks.mix import eval_items, parse_mix, sample_items

__all__ = ["EVAL_SEED_OFFSET", "run_eval"]


def _resolve(target: str) -> tuple[str, Optional[Path], Config]:
    """(model path, run dir or None, config) for a run directory, a model directory or 'shipped'."""
    p = Path(target)
    if (p / "config.yaml").exists():
        if not (p / "final" / "config.json").exists():
            raise ValueError(f"run {target!r} has no final model yet (final/); finish it with "
                             f"`tilt train --resume {target}` first")
        return str(p / "final"), p, load_config(p / "config.yaml")
    if target != "shipped" and not p.exists():
        raise FileNotFoundError(f"{target!r} is neither a run directory nor a model directory: it does not exist")
    return target, None, Config()


def _task_items(cfg: Config, tasks: Optional[str], per_cell: Optional[int], split: str, seeds: dict):
    """(items, contamination problems) of the built-in tasks."""
    mix = parse_mix(tasks or cfg.tasks.mix)
    per_cell = per_cell or cfg.tasks.eval_per_cell
    if split == "eval":
        items = eval_items(mix, per_cell=per_cell)
    elif split in ("train", "sft"):
        items = sample_items(mix, split=split, start=data_offset(cfg.seed) if split == "train" else 0,
                             count=per_cell * len(mix))
    else:
        raise ValueError(f"unknown split {split!r}; valid splits: eval, train, sft")
    return items, check_seed_overlap(seeds or {"train": {}}, items)


def _data_items(source: RowSource, cfg: Config, split: str, per_cell: Optional[int]):
    """(items, contamination problems) of a dataset: its held-out rows, or train rows (all contaminated)."""
    if split == "eval":
        items = source.eval_items()[:per_cell] if per_cell else source.eval_items()
        k = source.info["eval_overlap_train"]
        return items, [f"{k} of {source.info['eval_rows']} eval prompts also appear in the train rows "
                       "(normalised-prompt hash)"] * bool(k)
    if split == "train":
        items = source.train_items(data_offset(cfg.seed), per_cell or cfg.data.eval.max_rows or 256)
        return items, [f"{len(items)} items are rows of the train source"]
    raise ValueError(f"unknown split {split!r} for a dataset; valid splits: eval, train")


def run_eval(target: str, *, tasks: Optional[str], per_cell: Optional[int], n: int, k: str, split: str,
             allow_contaminated: bool, out: Optional[Path], seed: Optional[int], max_new_tokens: int,
             rewards: Optional[list[str]] = None, data: Optional[str] = None,
             breakdown: Optional[str] = None, decode=None, decoders: Optional[str] = None,
             value_model: Optional[str] = None) -> int:
    """Evaluate and write the JSON report; return the exit code (2 when refused).

    ``rewards`` replaces the run's reward.functions; ``data`` evaluates a dataset file (checked
    against the run's train rows when ``target`` is a run); ``breakdown`` names the column
    to break a dataset's scores down by; ``decode`` (a DecodeCfg) replaces the run's decoder.
    ``decoders`` (e.g. "sample,greedy,top_k:k=5") writes the decoder picture instead of the report:
    decoders.{json,csv,png} beside ``out`` (tilt.evaluation.frontier), ``value_model`` for those that need one."""
    model_path, run_dir, cfg = _resolve(target)
    if breakdown is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "eval": cfg.data.eval.model_copy(update={"breakdown": breakdown})})})
    own_train = data is not None and cfg.data.train.path is None  # a model, not a dataset run
    if data is not None and not own_train:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "eval": cfg.data.eval.model_copy(update={"path": data})})})
    fns = [resolve_reward_fn(r) for r in (rewards or cfg.reward.functions)]
    weights = (cfg.reward.weights if not rewards else None) or [1.0] * len(fns)
    ks = [int(x) for x in k.split(",") if x.strip()]
    pol = load_policy(model_path)
    pol.tokenizer = formatted(pol.tokenizer, cfg.model)  # the run's prompt_format / chat_template, as in training
    allowed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"allow_contaminated": True})})
    # overlap is counted here and refused below
    source = eval_only_source(cfg, pol.tokenizer, data) if own_train else build_source(allowed, pol.tokenizer)
    seeds = json.loads((run_dir / "seeds.json").read_text()) if run_dir and (run_dir / "seeds.json").exists() else {}
    if isinstance(source, RowSource):
        items, problems = _data_items(source, cfg, split, per_cell)
    else:
        items, problems = _task_items(cfg, tasks, per_cell, split, seeds)
    console = Console()
    for line in source.warnings:
        console.print(line, markup=False)
    if problems and not allow_contaminated:
        console.print(f"[red]refused:[/red] {len(problems)} problem(s) among {len(items)} items: they were "
                      "trained on, so their scores would measure memorisation, not skill (catalogue G3). "
                      "First problems:")
        for line in problems[:5]:
            console.print(f"  {line}", markup=False)
        console.print("Evaluate on held-out items (--split eval), or pass --allow-contaminated to score them "
                      "anyway; the report is then marked contaminated.")
        return 2
    for fn in fns:
        check_signature(fn, list(items[0].reward_columns()))
    eval_seed = seed if seed is not None else cfg.seed + EVAL_SEED_OFFSET
    if decoders is not None:
        from tilt.evaluation.frontier import render_frontier, run_frontier

        out_dir = out.parent if out is not None else (run_dir or Path("."))
        rows, paths = run_frontier(pol, items, spec=decoders, value_model=value_model, n=n,
                                   max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size, seed=eval_seed,
                                   reward_fns=fns, weights=weights, timeout=cfg.reward.timeout_s, out_dir=out_dir,
                                   log=lambda line: console.print(line, markup=False))
        console.print(render_frontier(rows), markup=False)
        for key, what in (("png", " (pass@1 vs KL and vs tokens)"), ("json", ""), ("csv", "")):
            console.print(f"wrote {paths[key]}{what}", markup=False, soft_wrap=True)  # paths are never wrapped
        return 0
    results = evaluate_items(pol.model, pol.tokenizer, items, n_samples=n, temperature=1.0,
                             max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size,
                             seed=eval_seed,
                             reward_fns=fns, weights=weights, timeout=cfg.reward.timeout_s,
                             progress=lambda line: console.print(line, markup=False),
                             decoding=decoding_from_config(decode or cfg.decode, pol))
    report = build_eval_report(results, ks=ks, contaminated=bool(problems), seeds=seeds or None)
    report["model"] = model_path
    report["decode"] = (decode or cfg.decode).model_dump()
    report["reward_functions"] = list(rewards or cfg.reward.functions)
    if isinstance(source, RowSource):
        report["dataset"] = source.info
    out = out or ((run_dir / "eval.json") if run_dir else Path("eval.json"))
    out.write_text(json.dumps(report, indent=1))
    console.print(render_eval_table(report))
    console.print(f"wrote {out}", markup=False, soft_wrap=True)
    return 0
