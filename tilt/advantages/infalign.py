"""InfAlign's calibrate-and-transform reward (CTRL, catalogue E1, arXiv:2412.19792 Sec. 4) as an
advantage estimator that wraps a base one: the base estimator sees Φ(C(r)) in place of r.

C(x, y) = P_{y' ~ pi_ref(.|x)}[r(x, y') < r(x, y)] + 0.5 P[r(x, y') = r(x, y)] is estimated from the
M reference rewards of the ``ref_rewards`` provider; Φ is exp(tC) for best-of-n, -exp(-tC) for
worst-of-n, C for plain sampling (tilt.decoding.infalign). A KL penalty placed in the reward is kept
apart from the calibration: it is added to Φ(C) (or handed to a base that adds token rewards itself),
so the loop solves max E[Φ(C)] - beta KL, the paper's reduction (its Eq. for CTRL's RL step).
"""
from __future__ import annotations

import inspect
from dataclasses import fields, replace
from typing import Optional

from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.batch import AdvantageInput
from tilt.decoding.infalign import calibrate_rewards, transform_calibrated

TRANSFORMS = ("bon", "won", "identity")
ADV_FIELDS = {f.name for f in fields(AdvantageInput)}


def check_infalign(*, base: str = "grpo", transform: str = "bon", t: float = 1.0,
                   base_kwargs: Optional[dict] = None) -> None:
    """The base must be an estimator that reads only AdvantageInput fields (no provider keywords),
    and ``base_kwargs`` only its keyword arguments."""
    if base == "infalign":
        raise ValueError("infalign's base cannot be infalign itself")
    entry = ADVANTAGES.entry(base)  # UnknownNameError lists the valid names
    allowed = [n for n, p in inspect.signature(entry.fn).parameters.items() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(base_kwargs or {}) - set(allowed))
    if unknown:
        raise ValueError(f"infalign base_kwargs {unknown} are not keywords of {base!r}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    needs = set(entry.needs(base_kwargs or {})) - ADV_FIELDS
    if needs:
        raise ValueError(f"infalign's base {base!r} reads {sorted(needs)}, which infalign does not pass on; "
                         f"use a base that reads only rewards, mask, token ids, entropy, values, steps")
    if transform not in TRANSFORMS:
        raise ValueError(f"infalign transform {transform!r} unknown; valid: {', '.join(TRANSFORMS)}")
    if transform != "identity" and not t > 0:
        raise ValueError(f"infalign t must be > 0, got {t!r}")


def _base_needs(kw: dict) -> tuple[str, ...]:
    return ("ref_rewards",) + ADVANTAGES.entry(kw.get("base", "grpo")).needs(kw.get("base_kwargs") or {})


@ADVANTAGES.register("infalign", needs=_base_needs, optional=("token_rewards",), check=check_infalign)
def infalign(inp: AdvantageInput, *, ref_rewards: Optional[Tensor] = None, base: str = "grpo",
             transform: str = "bon", t: float = 1.0, base_kwargs: Optional[dict] = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The base estimator's advantages of the calibrated-and-transformed reward Φ(C(r)), [B, G, T].

    Args:
        ref_rewards: [B, G, M] rewards of M pi_ref samples of each prompt (the provider repeats a
            prompt's M over its G rows; row 0 is read).
        base: the wrapped estimator (grpo, rloo, reinforce_pp, gae, ...); base_kwargs its keywords.
        transform: "bon" exp(tC), "won" -exp(-tC), "identity" C; t > 0 (the paper tunes t per n).
    Metrics: reward/calibrated_mean (mean C), reward/transformed_mean (mean Φ(C)).
    """
    if ref_rewards is None:
        raise ValueError("the 'infalign' estimator needs ref_rewards [B, G, M] (provider 'ref_rewards')")
    calibrated = calibrate_rewards(inp.rewards, ref_rewards[:, 0, :].to(inp.rewards.dtype))  # [B, G]
    phi = transform_calibrated(calibrated, kind=transform, t=t)  # [B, G]
    entry = ADVANTAGES.entry(base)
    tokens = inp.token_rewards
    if tokens is not None and "token_rewards" not in entry.meta.get("optional", ()):
        phi_in, tokens = phi + (tokens * inp.mask).sum(-1), None  # Φ(C) - beta sum_t kl_t
    else:
        phi_in = phi
    adv, metrics = entry.fn(replace(inp, rewards=phi_in, token_rewards=tokens), **(base_kwargs or {}))
    return adv, {**metrics, "reward/calibrated_mean": calibrated.detach().mean(),
                 "reward/transformed_mean": phi.detach().mean()}
