"""Plugins: code from outside tilt that registers methods, providers or reward functions.

``config.plugins`` lists module names or Python files; they are imported before the config's
registry names are checked, in ``tilt train``, ``tilt eval`` and every ``tilt compare`` subprocess
alike (each loads the config). docs/adding_a_method.md walks through one.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def import_plugins(specs: list[str]) -> None:
    """Import each plugin: a module name ("mypkg.methods") or a Python file ("path/to/methods.py").
    A plugin registers methods, providers or reward functions into tilt's registries on import."""
    for spec in specs:
        if spec.endswith(".py"):
            path = Path(spec).resolve()
            name = f"tilt_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
            if name in sys.modules:
                continue
            if not path.exists():
                raise ValueError(f"plugin file {spec!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise ValueError(f"plugin file {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                importlib.import_module(spec)
            except ImportError as exc:
                raise ValueError(f"plugin module {spec!r} could not be imported: {exc}") from exc
