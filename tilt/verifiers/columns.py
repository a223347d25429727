"""Read a per-completion dataset column from a reward call, in either calling convention.

TRL's convention passes every non-prompt column as a keyword list, one entry per completion
(``tests=[...]``). tilt's task rows pass ``columns=[{...}, ...]``, one dict per completion.
``column("tests", n, kwargs)`` returns the n entries from whichever is present.
"""
from __future__ import annotations

from typing import Any, Optional


def column(name: str, n: int, kwargs: dict[str, Any], *, required: bool = False,
           who: str = "reward") -> list[Optional[Any]]:
    """The ``name`` entry of each of the n rows; None where absent (a ValueError if ``required``)."""
    if name in kwargs and kwargs[name] is not None:
        vals = list(kwargs[name])
    elif kwargs.get("columns") is not None:
        vals = [(c or {}).get(name) for c in kwargs["columns"]]
    else:
        vals = [None] * n
    if len(vals) != n:
        raise ValueError(f"{who}: column {name!r} has {len(vals)} entries for {n} completions")
    if required:
        missing = [i for i, v in enumerate(vals) if v is None]
        if missing:
            have = sorted(set(kwargs) - {"columns"} | {k for c in kwargs.get("columns") or [] for k in (c or {})})
            raise ValueError(f"{who}: row(s) {missing[:5]} have no {name!r} column; "
                             f"columns present: {', '.join(have) or 'none'}")
    return vals
