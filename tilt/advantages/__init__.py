"""Advantage-estimator registry (catalogue C1-C6). Every module here registers on import.

An estimator is ``fn(inp: AdvantageInput, *, **hypers) -> (adv [B, G, T], metrics)``: per-token
advantages that are 0 wherever ``inp.mask == 0``, and a dict of scalar metrics that always holds
``adv/zero_frac`` (the fraction of completions whose every token has |A| < 1e-8). Registry meta:
``needs`` names the optional AdvantageInput fields an estimator cannot run without, ``optional``
the ones it reads when present.
"""
from __future__ import annotations

import importlib
import pkgutil

from tilt.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
