"""Sample / token selection registry (catalogue D1-D3). Every module here registers on import.

Selectors are pure functions of tensors that decide which groups, samples or tokens the loss
sees. Their signatures differ by level (registry meta ``level``: "group", "sample", "token"),
each documented on the function:

    dynamic_sampling  keep_groups(rewards [B, G], *, eps) -> bool [B]           (+ refill helper)
    d3s               d3s(adv [B, G, T], mask, entropy, *, step, ...) -> (keep [B, G],
                          token_keep [B, G, T], metrics)
    pf_ppo            pf_filter(rewards [B, G], *, strategy, generator) -> (keep [B, G], metrics)

Metrics report how much signal survives: ``select/groups_dropped``, ``select/tokens_kept``, ...
"""
from __future__ import annotations

import importlib
import pkgutil

from tilt.registry import Registry

SELECTORS: Registry = Registry("selector")

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
