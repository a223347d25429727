"""GGUF checkpoints: converted once to a Hugging Face directory (safetensors) in a cache, then reused.

``transformers`` reads GGUF through the ``gguf`` package and de-quantises every tensor to the
requested dtype (a Q4_1 file becomes full-precision weights holding the quantised values), so the
converted model computes what the GGUF model computes, up to llama.cpp's own kernels. Conversion
takes minutes for a 100M-parameter model; the cache makes it once per file.

Cache: ``$TILT_MODEL_CACHE`` or ``~/.cache/tilt/models``; entry ``gguf-<sha256 of the file>[:16]``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tilt.model import ModelLoadError

CACHE_ENV = "TILT_MODEL_CACHE"
DONE = ".tilt_complete"  # written last: a directory without it is an interrupted conversion


class GGUFError(ModelLoadError):
    """A GGUF file that cannot be read or converted; the message names the file and the cause."""


def cache_root() -> Path:
    """Where converted models live: ``$TILT_MODEL_CACHE`` or ``~/.cache/tilt/models``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/tilt/models").expanduser()


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes (the cache key: a changed file converts again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf(path: Path) -> None:
    """Raise GGUFError unless ``path`` is a complete GGUF file (magic, header, every tensor in range)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{str(path)!r} is not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError(f"reading {str(path)!r} needs the gguf package: pip install 'tilt-rl[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:  # a truncated file ends before its last tensors' data
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} > file size {size}")
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same to the user
        raise GGUFError(f"GGUF file {str(path)!r} is corrupt or truncated: {type(exc).__name__}: {exc}") from None


def convert_gguf(path: str | Path, *, echo=print) -> Path:
    """The Hugging Face directory converted from GGUF file ``path`` (converting it if not cached)."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise GGUFError(f"GGUF file {str(src)!r} does not exist")
    check_gguf(src)
    out = cache_root() / f"gguf-{file_digest(src)[:16]}"
    if (out / DONE).exists():
        return out
    echo(f"converting {src.name} to safetensors in {out} (once; later runs reuse it)")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert(src, tmp)
        (tmp / DONE).write_text(str(src) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier conversion
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert(src: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True,
                                                     dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for unsupported files
        raise GGUFError(f"transformers could not load GGUF file {str(src)!r}: {type(exc).__name__}: {exc}") from None
    # The weights are de-quantised plain tensors; transformers still marks the model as "quantised
    # with gguf" and refuses to save it. Drop the marker so it saves as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
