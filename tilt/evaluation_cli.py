"""`tilt eval`: load a run's final model (or any model), score held-out items, refuse contamination."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Console

from tilt.config import Config, load_config
from tilt.evaluate import evaluate_items
from tilt.evaluation.report import build_eval_report, check_seed_overlap, render_eval_table
from tilt.model import load_policy
from tilt.tasks.mix import eval_items, parse_mix, sample_items

EVAL_SEED_OFFSET = 12345  # the trainer's held-out evaluation samples with seed cfg.seed + this


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


def run_eval(target: str, *, tasks: Optional[str], per_cell: Optional[int], n: int, k: str, split: str,
             allow_contaminated: bool, out: Optional[Path], seed: Optional[int], max_new_tokens: int,
             decode=None) -> int:
    """Evaluate and write the JSON report; return the exit code (2 when refused)."""
    model_path, run_dir, cfg = _resolve(target)
    mix = parse_mix(tasks or cfg.tasks.mix)
    per_cell = per_cell or cfg.tasks.eval_per_cell
    ks = [int(x) for x in k.split(",") if x.strip()]
    if split == "eval":
        items = eval_items(mix, per_cell=per_cell)
    elif split in ("train", "sft"):
        from tilt.trainer import data_offset

        items = sample_items(mix, split=split, start=data_offset(cfg.seed) if split == "train" else 0,
                             count=per_cell * len(mix))
    else:
        raise ValueError(f"unknown split {split!r}; valid splits: eval, train, sft")
    seeds = json.loads((run_dir / "seeds.json").read_text()) if run_dir and (run_dir / "seeds.json").exists() else {}
    problems = check_seed_overlap(seeds or {"train": {}}, items)
    console = Console()
    if problems and not allow_contaminated:
        console.print(f"[red]refused:[/red] {len(problems)} of {len(items)} items were generated from seeds "
                      "that trained this model, so their scores would measure memorisation, not skill "
                      "(catalogue G3). First problems:")
        for line in problems[:5]:
            console.print(f"  {line}")
        console.print("Evaluate on held-out seeds (--split eval), or pass --allow-contaminated to score them "
                      "anyway; the report is then marked contaminated.")
        return 2
    pol = load_policy(model_path)
    from tilt.decoding.lm import decoding_from_config

    results = evaluate_items(pol.model, pol.tokenizer, items, n_samples=n, temperature=1.0,
                             max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size,
                             seed=seed if seed is not None else cfg.seed + EVAL_SEED_OFFSET,
                             decoding=decoding_from_config(decode or cfg.decode, pol))
    report = build_eval_report(results, ks=ks, contaminated=bool(problems), seeds=seeds or None)
    report["model"] = model_path
    report["decode"] = (decode or cfg.decode).model_dump()
    out = out or ((run_dir / "eval.json") if run_dir else Path("eval.json"))
    out.write_text(json.dumps(report, indent=1))
    console.print(render_eval_table(report))
    console.print(f"wrote {out}")
    return 0
