"""Optional experiment-tracker backends beside metrics.jsonl and TensorBoard: W&B and trackio.

``log.backends: [wandb, trackio]`` chooses them by name (one registry, STYLE rule 2). Each gets
exactly the rows written to ``metrics.jsonl`` (same step, same keys; a non-finite value is sent
as NaN where the JSONL has null). Both honour their offline modes: ``WANDB_MODE=offline`` writes
``<run_dir>/wandb/offline-run-*/run-*.wandb``; trackio is local unless a Space is configured and
writes ``$TRACKIO_DIR/<project>.db``. A backend whose package is missing is an ImportError naming
the extra to install (``pip install 'tilt[wandb]'``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from tilt.config import ConfigError
from tilt.registry import Registry


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


TRACKERS: Registry = Registry("logging backend")


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"log.backends has {extra!r} but the {module!r} package is not installed: "
                          f"pip install 'tilt[{extra}]'") from exc


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics row as numbers; None (a non-finite value in the JSONL) is sent as NaN."""
    return {k: (math.nan if v is None else v) for k, v in metrics.items() if v is None or isinstance(v, (int, float))}


class WandbTracker:
    """Logs each row with ``run.log(metrics, step=step)``; files under ``<run_dir>/wandb``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str):
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                              resume="allow", id=_run_id(run_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """Logs each row with ``trackio.log(metrics, step=step)`` into the local trackio store."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str):
        self.trackio = _need("trackio", "trackio")
        self.trackio.init(project=project, name=run_dir.name, config=config, resume="allow", embed=False,
                          auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.trackio.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


def _run_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run appends to the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


TRACKERS.register("wandb", extra="wandb")(WandbTracker)
TRACKERS.register("trackio", extra="trackio")(TrackioTracker)


def make_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """One tracker per name in ``log.backends``; project from $TILT_PROJECT (default "tilt")."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"log.backends has unknown backend(s) {unknown}; valid names: "
                          f"{', '.join(TRACKERS.names())} (metrics.jsonl and TensorBoard are always on / log.tensorboard)")
    project = os.environ.get("TILT_PROJECT", "tilt")
    make: list[Callable[..., Tracker]] = [TRACKERS.get(n) for n in names]
    return [m(Path(run_dir), config, project) for m in make]


__all__ = ["TRACKERS", "Tracker", "TrackioTracker", "WandbTracker", "make_trackers"]
