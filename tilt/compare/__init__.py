"""``tilt compare``: train a grid of methods x tasks x seeds and report them with honest statistics.

``run_compare`` is what the CLI calls; the pieces are ``spec`` (the YAML schema), ``runner``
(parallel, resumable subprocesses), ``report`` (rliable aggregates, report.md) and ``plots``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from tilt.compare.runner import DEFAULT_COMMAND, GridResult, Run, check_overrides, expand_grid, run_grid
from tilt.compare.spec import CompareSpec, SpecError, load_spec, parse_spec


def run_compare(
    spec_path: str | Path,
    out_dir: str | Path,
    *,
    command: Sequence[str] = DEFAULT_COMMAND,
    workers: Optional[int] = None,
    reps: int = 2000,
    report_only: bool = False,
    validate: bool = True,
    echo=print,
) -> int:
    """Run (or resume) every run of the spec, then write OUT/report.md; return the exit code.

    Args:
        spec_path: compare spec YAML (see ``CompareSpec``).
        out_dir: output directory (runs/, report.md, report.json, *.png).
        command: argv prefix launching the trainer CLI (default: this python -m tilt.cli).
        workers: concurrent runs (default: spec.workers, else os.cpu_count()).
        reps: bootstrap replications of the report's CIs.
        report_only: skip training; aggregate whatever runs have finished.
        validate: check each method's overrides against the training config first.
    Returns:
        0 when every run finished, 1 when any failed (the report covers the finished ones).
    """
    from tilt.compare.report import write_report

    spec = load_spec(spec_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    if not report_only:
        if validate:
            check_overrides(spec)
        result = run_grid(spec, out, command=command, workers=workers)
        echo(f"{result.total} runs: {len(result.skipped)} already finished, {len(result.finished)} finished now, "
             f"{len(result.failed)} failed")
        for name in result.failed:  # their log tails were printed as they failed
            echo(f"FAILED {name}: see {out / 'runs' / name / 'log.txt'}")
        code = result.exit_code
    write_report(spec, out, reps=reps)
    echo(f"report: {out / 'report.md'}")
    return code


__all__ = ["CompareSpec", "GridResult", "Run", "SpecError", "expand_grid", "load_spec", "parse_spec",
           "run_compare", "run_grid"]
