"""Metrics out: JSONL (the source of truth), TensorBoard events, a PNG of the curves, progress.

``metrics.jsonl`` has one JSON object per logged step, keyed by step. On resume, rows past the
checkpoint step are dropped first and a replayed step replaces its row, so a resumed run's file
equals an uninterrupted one's.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Keys that measure wall-clock and so differ between otherwise identical runs.
TIMING_KEYS = ("tokens_per_s", "time/step_s", "time/elapsed_s", "time/fwd_bwd_s", "time/optimizer_s")


class MetricsLog:
    """Metrics writer keyed by step (JSONL + optional TensorBoard).

    ``resume_step``: rows of steps after it are dropped on open, because the resumed run logs
    them again (``-1`` drops every row: a run killed before its first checkpoint restarts from
    the before-training evaluation). Logging a step that already has a row replaces that row,
    so a replay never duplicates a step. Lines that are not JSON objects with an integer
    ``step`` (a torn last line after a kill, or garbage) are moved to ``metrics.jsonl.dropped``
    with a message naming the file and line.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int | None = None,
                 echo: Callable[[str], None] = print, trackers: list = ()):
        self.path = run_dir / "metrics.jsonl"
        self._steps: set[int] = set()
        if resume_step is not None and self.path.exists():
            rows = self._read_rows(echo)
            kept = [r for r in rows if r["step"] <= resume_step]
            self._steps = {r["step"] for r in kept}
            _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        self._trackers = list(trackers)  # tilt.trackers backends (W&B, trackio), sent the JSONL rows

    def _read_rows(self, echo: Callable[[str], None]) -> list[dict[str, Any]]:
        """The file's rows; bad lines go to ``metrics.jsonl.dropped`` with one message."""
        rows, bad = [], []
        for i, ln in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
                ok = isinstance(row, dict) and isinstance(row.get("step"), int)
            except json.JSONDecodeError:
                ok = False
            if ok:
                rows.append(row)
            else:
                bad.append((i, ln))
        if bad:
            with open(self.path.with_name(self.path.name + ".dropped"), "a") as f:
                f.write("".join(ln + "\n" for _, ln in bad))
            echo(f"{self.path}: dropped {len(bad)} line(s) that are not JSON rows with an integer step "
                 f"(line {', '.join(str(i) for i, _ in bad)}: {bad[0][1][:60]!r}); "
                 f"kept in {self.path.name}.dropped")
        by_step = {r["step"]: r for r in rows}  # a duplicated step keeps its last row
        return [by_step[s] for s in sorted(by_step)]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if step in self._steps:  # a replayed step: replace its row instead of adding a second one
            self._f.close()
            rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
            rows = [row if r.get("step") == step else r for r in rows]
            _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
            self._f = open(self.path, "a")
        else:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
            self._steps.add(step)
        for t in self._trackers:
            t.log(step, {k: v for k, v in row.items() if k != "step"})
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        for t in self._trackers:
            t.close()
        if self._tb is not None:
            self._tb.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def plot_curves(run_dir: Path) -> Path:
    """curves.png: reward, accuracy, KL and entropy against step (held-out eval as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    panels = [("reward/mean", "reward"), ("reward/accuracy", "accuracy"), ("kl/mean", "KL to reference"),
              ("entropy", "entropy (nats/token)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, label="train")
        if key == "reward/accuracy":
            ev = [(r["step"], r["eval/greedy"]) for r in rows if r.get("eval/greedy") is not None]
            ev1 = [(r["step"], r["eval/pass1"]) for r in rows if r.get("eval/pass1") is not None]
            if ev:
                ax.plot(*zip(*ev), "o-", label="held-out greedy")
            if ev1:
                ax.plot(*zip(*ev1), "s-", label="held-out pass@1 T=1")
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


class Progress:
    """A rich progress bar on a TTY; plain lines otherwise (CI, log files)."""

    FIELDS = (("reward/mean", "reward", "{:.3f}"), ("reward/accuracy", "acc", "{:.3f}"),
              ("kl/mean", "kl", "{:.4f}"), ("tokens_per_s", "tok/s", "{:.0f}"))

    def __init__(self, total: int, start: int, mode: str = "auto", every: int = 1):
        self.total, self.every, self.t0, self.start = total, every, time.time(), start
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self._bar = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeRemainingColumn

            self._bar = RP(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, stats="")

    def _stats(self, m: dict[str, float]) -> str:
        return "  ".join(f"{name} {fmt.format(m[k])}" for k, name, fmt in self.FIELDS if m.get(k) is not None)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.mode == "rich":
            self._bar.update(self._task, completed=step, stats=self._stats(metrics))
        elif self.mode == "plain" and (step % self.every == 0 or step == self.total):
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {self._stats(metrics)}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
