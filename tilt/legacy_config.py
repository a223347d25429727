"""Old config files keep loading: fields that moved into a method's keyword arguments.

Method-specific settings live in the method's ``kwargs`` (validated against the annotated
signatures of the method, its providers and its state: ``tilt.wiring.resolve``). A config written
before that change still loads: each moved field is translated to its new place with a
``MovedFieldWarning`` naming it, or dropped silently where it holds its old default (every saved
``config.yaml`` of an old run lists every field).
"""
from __future__ import annotations

import warnings
from typing import Any

# Fields that moved into a method's keyword arguments: old (section, field) -> (section, keyword, old default).
MOVED = {("loss", "prev_refresh"): ("loss", "prev_refresh", 10),
         ("loss", "astar_samples"): ("loss", "v_star_samples", 8),
         ("loss", "astar_beta"): ("loss", "v_star_beta", None),
         ("loss", "aer_tau"): ("loss", "tau", 0.4),
         ("loss", "aer_lr"): ("loss", "controller_lr", 1e-3),
         ("loss", "aer_alpha_max"): ("loss", "alpha_max", 1.0),
         ("advantage", "mc_continuations"): ("advantage", "continuations", 4),
         ("advantage", "spo_segments"): ("advantage", "max_segments", 4),
         ("value", "coef"): ("advantage", "value_coef", 0.5),
         ("value", "clip_range"): ("advantage", "value_clip", 0.2)}


class MovedFieldWarning(UserWarning):
    """A config field that moved into a method's keyword arguments was translated."""


def translate_moved(raw: dict[str, Any]) -> dict[str, Any]:
    """Old config files keep loading: each moved field goes to its new place with a warning naming
    it, or is dropped when it holds its old default (as every saved config.yaml of an old run does)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for (sec, key), (new_sec, new_key, default) in MOVED.items():
        if not isinstance(out.get(sec), dict) or key not in out[sec]:
            continue
        value = out[sec].pop(key)
        if value != default:
            target = out.setdefault(new_sec, {})
            kwargs = dict(target.get("kwargs") or {})
            kwargs.setdefault(new_key, value)
            target["kwargs"] = kwargs
            warnings.warn(f"config field {sec}.{key} moved to {new_sec}.kwargs.{new_key}; translated "
                          f"({new_sec}.kwargs.{new_key}={value!r}); update the config", MovedFieldWarning, stacklevel=3)
    if out.get("value") == {}:
        out.pop("value")
    return out
