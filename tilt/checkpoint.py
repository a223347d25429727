"""Atomic checkpoints: write everything into a temp directory, fsync, then rename.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn
one. ``checkpoints/latest`` names the newest complete checkpoint and is itself replaced
atomically (write temp file, ``os.replace``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "sampler": generator.get_state(),
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module, optimizer, scheduler,
                    generator: torch.Generator, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; prune to the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(_untie(state), str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(generator)}, tmp / "train_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store independent copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Temp directories are ignored."""
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if cand.is_dir():
            return cand
    done = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.exists() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state dict."""
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    blob = torch.load(path / "train_state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"], generator)
    return json.loads((path / "trainer_state.json").read_text())
