"""Metrics out: JSONL (the source of truth), TensorBoard events, a PNG of the curves, progress.

``metrics.jsonl`` has one JSON object per logged step. On resume, lines past the checkpoint
step are dropped first, so a resumed run's file equals an uninterrupted one's.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# Keys that measure wall-clock and so differ between otherwise identical runs.
TIMING_KEYS = ("tokens_per_s", "time/step_s", "time/elapsed_s", "time/fwd_bwd_s", "time/optimizer_s")


class MetricsLog:
    """Append-only metrics writer (JSONL + optional TensorBoard)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int | None = None, trackers: list = ()):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=(resume_step + 1) if resume_step else None)
        self._trackers = list(trackers)  # tilt.trackers backends (W&B, trackio), sent the JSONL rows

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
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
