"""Resuming a run: refuse an edited config, and fall back past unreadable checkpoints.

A checkpoint stores the config it was written under (``config.json``). ``tilt train --resume``
reads the run's ``config.yaml``; if a field that shapes the run differs from the checkpoint's,
the resume is refused with the fields named, because the restored state would silently win over
part of the edit (a changed ``optim.lr`` is overwritten by the optimizer state) or not fit it at
all (a changed method has other parameters). Fields in ``RESUME_MAY_CHANGE`` only affect logging,
checkpoint cadence, timeouts or threads and may be edited freely.

A checkpoint any of whose files cannot be read is reported by name and the next older one is
used; the rows and steps after it are simply replayed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tilt.checkpoint import CheckpointError, apply_checkpoint, checkpoints_newest_first, read_checkpoint, read_json
from tilt.config import ConfigError

# Dotted prefixes of config fields a resume may change: they do not enter the saved state.
RESUME_MAY_CHANGE = ("run_dir", "threads", "keep_freed_memory", "log.", "checkpoint.every", "checkpoint.keep",
                     "reward.timeout_s", "eval.batch_size")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; leaves (incl. lists and kwargs dicts' items) by dotted key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: old -> new"`` for every field that differs, except those a resume may change."""
    a, b = flatten(saved), flatten(json.loads(json.dumps(current)))  # tuples -> lists, as saved
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys
            if a.get(k) != b.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p))
                                                for p in RESUME_MAY_CHANGE)]


def check_config_unchanged(run_dir: Path, current: dict[str, Any]) -> None:
    """ConfigError naming the differing fields if ``config.yaml`` was edited since the newest
    checkpoint whose config can be read was written. No checkpoint: nothing to compare."""
    for ck in checkpoints_newest_first(run_dir / "checkpoints"):
        if not (ck / "config.json").exists():
            return  # written before checkpoints stored their config
        try:
            saved = read_json(ck / "config.json")
        except CheckpointError:
            continue  # reported again (and skipped) when the checkpoint is loaded
        changed = config_changes(saved, current)
        if changed:
            raise ConfigError(
                f"cannot resume {str(run_dir)!r}: its config.yaml differs from the config checkpoint "
                f"{ck.name} was written with, in {len(changed)} field(s): {'; '.join(changed)}. "
                "The saved optimizer and model state would silently override or not fit these changes. "
                "Restore config.yaml, or start a new run (e.g. `tilt train -c <edited config> --run-dir <new>`).")
        return


def restore_newest_intact(root: Path, *, model: torch.nn.Module, optimizer, scheduler,
                          generator: torch.Generator, echo: Callable[[str], None]
                          ) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """Load the newest checkpoint under ``root`` whose files all read; (path, trainer state).

    (None, None) when there is no checkpoint. ConfigError when there are checkpoints but none is
    readable (the user must decide whether to start over), naming each file that failed.
    """
    failed: list[str] = []
    for ck in checkpoints_newest_first(root):
        try:
            blob = read_checkpoint(ck)
        except CheckpointError as exc:
            failed.append(str(exc))
            echo(f"checkpoint {ck.name} is unreadable: {exc}; trying the next older checkpoint")
            continue
        try:
            state = apply_checkpoint(blob, model=model, optimizer=optimizer, scheduler=scheduler,
                                     generator=generator)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint {ck} does not fit the model and optimizer built from the run's "
                              f"config.yaml ({type(exc).__name__}: {str(exc)[:300]})") from None
        if failed:
            echo(f"resuming from the older checkpoint {ck.name}; the steps after it are run again")
        return ck, state
    if failed:
        raise ConfigError(f"no readable checkpoint in {str(root)!r}: " + "; ".join(failed)
                          + ". Move the checkpoints directory away to start the run over from step 0.")
    return None, None
