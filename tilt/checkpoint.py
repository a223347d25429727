"""Atomic checkpoints: write everything into a temp directory, fsync, then rename.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn
one. ``checkpoints/latest`` names the newest complete checkpoint and is itself replaced
atomically (write temp file, ``os.replace``). Each checkpoint also stores the run's config
(``config.json``) so a resume can refuse an edited ``config.yaml`` (``tilt.resume``). Reading is
separate from applying: ``read_checkpoint`` parses every file first and raises ``CheckpointError``
naming the file that is missing, truncated or garbage, so nothing is half-restored.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

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


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names the file and the cause."""


def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module, optimizer, scheduler,
                    generator: torch.Generator, trainer_state: dict[str, Any], keep: int = 2,
                    config: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; prune to the ``keep`` newest.

    ``config`` (the run's resolved config as JSON data) is stored as ``config.json`` so a resume
    can tell whether ``config.yaml`` was edited since this checkpoint was written.
    """
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
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config))
    _test_pause("TILT_TEST_SLOW_CKPT_S")
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


def _test_pause(var: str) -> None:
    """Test hook: sleep ``$var`` seconds inside a checkpoint write (the reliability soak kills the
    process there). Unset in normal use."""
    if os.environ.get(var):
        import time

        time.sleep(float(os.environ[var]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Temp directories are ignored."""
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if cand.is_dir():
            return cand
    done = checkpoints_newest_first(root)
    return done[0] if done else None


def checkpoints_newest_first(root: Path) -> list[Path]:
    """Every renamed-into-place ``step_*`` directory under ``root``, newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.exists() else []


def read_json(path: Path) -> Any:
    """``json.loads`` of a checkpoint file; CheckpointError naming the file when it is torn or missing."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every file of checkpoint ``path`` parsed into memory (nothing applied yet).

    Raises CheckpointError naming the first file that is missing, truncated or garbage.
    """
    out: dict[str, Any] = {}
    try:
        out["model"] = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path / 'model.safetensors'} cannot be read ({type(exc).__name__}: {exc})") from None
    try:
        out["blob"] = torch.load(path / "train_state.pt", weights_only=False)
        out["blob"]["optimizer"], out["blob"]["scheduler"], out["blob"]["rng"]  # noqa: B018 - all three present
    except Exception as exc:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"{path / 'train_state.pt'} cannot be read ({type(exc).__name__}: {exc})") from None
    out["state"] = read_json(path / "trainer_state.json")
    out["config"] = read_json(path / "config.json") if (path / "config.json").exists() else None
    return out


def apply_checkpoint(ck: dict[str, Any], *, model: torch.nn.Module, optimizer, scheduler,
                     generator: torch.Generator) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from ``read_checkpoint``; return the trainer state."""
    model.load_state_dict(ck["model"], strict=True)
    optimizer.load_state_dict(ck["blob"]["optimizer"])
    scheduler.load_state_dict(ck["blob"]["scheduler"])
    set_rng_state(ck["blob"]["rng"], generator)
    return ck["state"]


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state dict."""
    return apply_checkpoint(read_checkpoint(path), model=model, optimizer=optimizer, scheduler=scheduler,
                            generator=generator)


def save_pretrained_atomic(model, tokenizer, out: Path, files: dict[str, str] | None = None,
                           also: Optional[Callable[[Path], None]] = None) -> Path:
    """``model`` and ``tokenizer`` in Hugging Face format (plus ``files``: name -> text, and whatever
    ``also(tmp)`` writes) at ``out``, written to a temp directory beside it and renamed, so ``out``
    is never half-written."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    if also is not None:
        also(tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    return out
