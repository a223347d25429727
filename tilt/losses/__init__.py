"""Policy-loss registry. Every module in this package registers its entries on import.

A loss is ``fn(inp: PolicyLossInput, *, **hypers) -> (per_token_loss [N, T], metrics)``;
its registry meta declares ``reduction`` (a mode of tilt.reduction) and ``needs`` (the optional
PolicyLossInput fields it reads). The learner reduces with tilt.reduction.reduce_tokens.
"""
from __future__ import annotations

import importlib
import pkgutil

from tilt.registry import Registry

LOSSES: Registry = Registry("loss")

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
