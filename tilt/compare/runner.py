"""Run a compare grid (method x task x seed) as parallel, resumable ``tilt train`` subprocesses.

Each run has its own directory ``OUT/runs/<method>__<task-slug>__seed<k>/``:
  * summary.json present        -> finished, skipped;
  * checkpoints/ but no summary -> interrupted, relaunched with ``train --resume D``;
  * otherwise                   -> started with ``train --run-dir D --set ...``.
stdout and stderr of every attempt are appended to ``D/log.txt``. A failing run is reported
with the tail of its log and does not stop the others.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tilt.compare.spec import DATASET, CompareSpec, SpecError, task_slug

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "tilt.cli")
MANIFEST = "compare_run.json"  # what the grid asked of this directory, to refuse reusing it for another spec
TAIL_LINES = 25


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    method: str
    task: str
    seed: int
    run_dir: Path
    overrides: dict[str, Any]  # every --set of a fresh start, grid keys included

    @property
    def name(self) -> str:
        return self.run_dir.name


def run_name(method: str, task: str, seed: int) -> str:
    """Directory name of a run: "<method>__<task-slug>__seed<k>"."""
    return f"{method}__{task_slug(task)}__seed{seed}"


def expand_grid(spec: CompareSpec, out_dir: Path) -> list[Run]:
    """Every (method, task, seed) of ``spec`` as a Run under ``out_dir/runs``, in spec order."""
    runs = []
    for method, mspec in spec.methods.items():
        for task in spec.tasks:
            for seed in spec.seeds:
                overrides = dict(mspec.overrides)
                overrides.update({"seed": seed} if task == DATASET else {"seed": seed, "tasks.mix": task})
                if spec.steps is not None:
                    overrides["train.steps"] = spec.steps
                runs.append(Run(method, task, seed, Path(out_dir) / "runs" / run_name(method, task, seed), overrides))
    return runs


def run_status(run_dir: Path) -> str:
    """"done" (summary.json says complete), "interrupted" (checkpoints/, no summary) or "new"."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("complete") is True:
                return "done"
        except (OSError, ValueError):
            pass
    return "interrupted" if (run_dir / "checkpoints").is_dir() else "new"


def _set_value(value: Any) -> str:
    """A --set value the trainer parses back (as YAML) to the same Python value."""
    return value if isinstance(value, str) else json.dumps(value)


def train_args(run: Run, *, resume: bool, base_config: Optional[Path] = None) -> list[str]:
    """Arguments after the command: ``train --resume D`` or ``train --run-dir D [--config F] --set k=v ...``."""
    if resume:
        return ["train", "--resume", str(run.run_dir)]
    args = ["train", "--run-dir", str(run.run_dir)]
    if base_config is not None:
        args += ["--config", str(base_config)]
    for key, value in run.overrides.items():
        args += ["--set", f"{key}={_set_value(value)}"]
    return args


def check_overrides(spec: CompareSpec) -> None:
    """Validate every method's overrides against the training config before launching anything.

    Raises SpecError naming the method and the config error (unknown key, unknown loss name, ...).
    """
    from tilt.config import ConfigError, load_config

    for method, mspec in spec.methods.items():
        run = Run(method, spec.tasks[0], spec.seeds[0], Path("."), {**mspec.overrides, "seed": spec.seeds[0]})
        sets = [a for a in train_args(run, resume=False)[3:] if a != "--set"]
        try:
            load_config(spec.base_config, overrides=sets)
        except ConfigError as exc:
            raise SpecError(f"method {method!r} has overrides the trainer rejects:\n{exc}") from None


def check_manifest(run: Run, base_config: Optional[Path]) -> None:
    """Write D/compare_run.json, or refuse if D was made for a different method / config."""
    want = {"method": run.method, "task": run.task, "seed": run.seed, "overrides": run.overrides,
            "base_config": str(base_config) if base_config else None}
    path = run.run_dir / MANIFEST
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise SpecError(f"run directory {str(run.run_dir)!r} was made by a different compare spec "
                            f"(it has {have}, this spec wants {want}); use another output directory")
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=1))


def log_tail(run_dir: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of D/log.txt ("" when there is none)."""
    try:
        return "\n".join((run_dir / "log.txt").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class GridResult:
    """What one invocation did: runs skipped as finished, finished now, and failed (with log tails)."""

    total: int
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _child_env(workers: int) -> dict[str, str]:
    """Share the cores between concurrent runs unless the caller pinned thread counts."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def _launch(run: Run, argv: list[str], env: dict[str, str], resume: bool) -> tuple[subprocess.Popen, Any]:
    log = open(run.run_dir / "log.txt", "a", buffering=1)
    log.write(f"\n=== tilt compare {'resume' if resume else 'start'} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              f"{' '.join(argv)}\n")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return proc, log


def _record(run: Run, returncode: int, result: GridResult) -> str:
    """File a finished subprocess under finished or failed (with its log tail); return the event."""
    if returncode == 0 and run_status(run.run_dir) == "done":
        result.finished.append(run.name)
        return "done"
    why = f"exit code {returncode}" if returncode else "exited 0 without a complete summary.json"
    result.failed[run.name] = f"{why}; last lines of {run.run_dir / 'log.txt'}:\n{log_tail(run.run_dir)}"
    return "failed"


def run_grid(
    spec: CompareSpec,
    out_dir: str | Path,
    *,
    command: Sequence[str] = DEFAULT_COMMAND,
    workers: Optional[int] = None,
    progress: Optional[Callable[[str, Run, "GridResult", int], None]] = None,
    poll_s: float = 0.1,
) -> GridResult:
    """Run every unfinished run of the grid, at most ``workers`` at a time.

    Args:
        spec: the validated compare spec.
        out_dir: output directory; runs go to out_dir/runs/<name>.
        command: argv prefix that launches the trainer CLI (tests inject a fake trainer).
        workers: concurrent runs (default: spec.workers, else os.cpu_count()).
        progress: callback(event, run, result, running) with event "start"/"done"/"failed";
            default: ``ProgressDisplay`` (rich on a TTY, plain lines otherwise).
    Returns:
        GridResult; ``exit_code`` is non-zero when any run failed.
    """
    out_dir = Path(out_dir)
    runs = expand_grid(spec, out_dir)
    workers = workers or spec.workers or os.cpu_count() or 1
    for run in runs:
        check_manifest(run, spec.base_config)
    result = GridResult(total=len(runs), skipped=[r.name for r in runs if run_status(r.run_dir) == "done"])
    pending = [r for r in runs if r.name not in result.skipped]
    display = None
    if progress is None:
        display = progress = ProgressDisplay(result.total, len(result.skipped))
    env = _child_env(workers)
    active: dict[str, tuple[Run, subprocess.Popen, Any]] = {}
    try:
        while pending or active:
            while pending and len(active) < workers:
                run = pending.pop(0)
                resume = run_status(run.run_dir) == "interrupted"
                argv = [*command, *train_args(run, resume=resume, base_config=spec.base_config)]
                active[run.name] = (run, *_launch(run, argv, env, resume))
                progress("start", run, result, len(active))
            for name, (run, proc, log) in list(active.items()):
                if proc.poll() is not None:
                    log.close()
                    del active[name]
                    progress(_record(run, proc.returncode, result), run, result, len(active))
            if active:
                time.sleep(poll_s)
    except BaseException:
        for run, proc, log in active.values():  # our own children only; their checkpoints stay
            proc.terminate()
            proc.wait()
            log.close()
        raise
    finally:
        if display is not None:
            display.close()
    return result


class ProgressDisplay:
    """Overall progress: a rich bar (runs done / total, running now) on a TTY, plain lines otherwise."""

    def __init__(self, total: int, already_done: int, console: Any = None):
        from rich.console import Console

        self.console = console or Console()
        self.total, self.running = total, set()
        self.bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[now]}"), console=self.console)
            self.task = self.bar.add_task("runs", total=total, completed=already_done, now="")
            self.bar.start()
        else:
            self._line(f"compare: {total} runs, {already_done} already finished")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def __call__(self, event: str, run: Run, result: GridResult, running: int) -> None:
        (self.running.add if event == "start" else self.running.discard)(run.name)
        done = len(result.skipped) + len(result.finished) + len(result.failed)
        if event == "failed":
            self._line(f"FAILED {run.name}: {result.failed[run.name]}")
        if self.bar is not None:
            self.bar.update(self.task, completed=done, now="running: " + ", ".join(sorted(self.running)))
        elif event != "failed":
            self._line(f"[{done}/{self.total}] {event} {run.name} ({running} running)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
