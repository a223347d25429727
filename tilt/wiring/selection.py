"""Sample / token filters applied to a scored batch after its advantages (catalogue D2, D3).

A filter is ``fn(batch, ctx) -> (batch, metrics)``, chosen once by ``make_filter``:

    none       keep everything (the default)
    d3s        keep the max-Var(A) rollouts of each group and the top |A|*H tokens; the token
               choice becomes the learner's ``loss_mask`` (attention still sees every token)
    pf_ppo     keep the rollouts chosen by the strategy (best_random, best_of_n, ...)

DAPO dynamic sampling (D1) acts earlier, while drawing prompts: tilt.wiring.sampling.
Advantages are computed on the full groups before a filter drops rows.

``with_lp_selection`` wraps a filter for Lp-Reg (catalogue A6): after filtering, it ranks the
batch's tokens once (``lp_reg_selection`` on the sampling policy's log-probs) and stores the
choice as ``LearnerBatch.lp_select``, so splitting into micro-batches cannot change it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.config import ConfigError
from tilt.learner import LearnerBatch
from tilt.losses.regularizers import lp_reg_selection
from tilt.selection import SELECTORS
from tilt.selection.dynamic_sampling import check_refill_args, refill

# Keywords the loop supplies itself; every other keyword of the selector comes from selection.kwargs.
RESERVED = {"dynamic_sampling": ("draw_fn", "batch_size"), "d3s": ("step", "total_steps"), "pf_ppo": ("generator",)}


@dataclass
class SelectContext:
    """What a filter may read about the batch it filters."""

    adv: Tensor  # [B, G, T] advantages
    rewards: Tensor  # [B, G]
    entropy: Optional[Tensor]  # [N, T] sampling-policy entropy (d3s)
    step: int  # 1-based RL step


Filter = Callable[[LearnerBatch, SelectContext], tuple[LearnerBatch, dict[str, float]]]


def selector_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``selection.kwargs`` checked against the selector's keyword parameters (minus RESERVED)."""
    fn = refill if name == "dynamic_sampling" else SELECTORS.get(name)
    params = inspect.signature(fn).parameters
    allowed = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in RESERVED[name]]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise ConfigError(f"selection.kwargs: unknown keyword {bad[0]!r} for selector {name!r}; "
                          f"allowed: {', '.join(allowed)}")
    for k, v in kwargs.items():  # scalar parameters: the value must have the annotated type (int is a float)
        want = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}.get(str(params[k].annotation))
        if want and (not isinstance(v, want) or (isinstance(v, bool) and bool not in want)):
            raise ConfigError(f"selection.kwargs.{k}: {name!r} expects {want[-1].__name__}, got {v!r}")
    if name == "dynamic_sampling":
        try:
            check_refill_args(**{k: v for k, v in kwargs.items() if k in ("max_draws", "oversample")})
        except ValueError as exc:
            raise ConfigError(f"selection.kwargs: {exc}") from None
    return dict(kwargs)


def keep_all(batch: LearnerBatch, ctx: SelectContext) -> tuple[LearnerBatch, dict[str, float]]:
    return batch, {}


def d3s_filter(batch: LearnerBatch, ctx: SelectContext, *, total_steps: int, **kwargs: Any
               ) -> tuple[LearnerBatch, dict[str, float]]:
    """D3S (arXiv:2509.22115): drop unkept rollouts, mask unkept tokens out of the loss. The
    schedule runs on (step - 1) / total_steps, so step 1 uses the start fractions."""
    B, G, T = ctx.adv.shape
    mask = batch.completion_mask.view(B, G, T).float()  # [B, G, T]
    keep, token_keep, m = SELECTORS.get("d3s")(ctx.adv, mask, ctx.entropy.view(B, G, T), step=ctx.step - 1,
                                               total_steps=total_steps, **kwargs)
    loss_mask = token_keep.reshape(B * G, T).to(batch.completion_mask.dtype)  # [N, T]
    rows = keep.reshape(-1).nonzero().squeeze(-1)  # kept rows, group-major
    return replace(batch, loss_mask=loss_mask).select(rows), {k: float(v) for k, v in m.items()}


def pf_filter_batch(batch: LearnerBatch, ctx: SelectContext, *, generator: torch.Generator, **kwargs: Any
                    ) -> tuple[LearnerBatch, dict[str, float]]:
    """PF-PPO (arXiv:2409.06957): keep only the rollouts the strategy selects."""
    keep, m = SELECTORS.get("pf_ppo")(ctx.rewards, generator=generator, **kwargs)  # [B, G]
    rows = keep.reshape(-1).nonzero().squeeze(-1)
    return batch.select(rows), {k: float(v) for k, v in m.items()}


def make_filter(name: str, kwargs: dict[str, Any], *, total_steps: int, generator: torch.Generator) -> Filter:
    """The batch filter of ``selection.name`` (dynamic_sampling filters while sampling: keep_all here)."""
    if name in ("none", "dynamic_sampling"):
        return keep_all
    kw = selector_kwargs(name, kwargs)
    if name == "d3s":
        return lambda b, ctx: d3s_filter(b, ctx, total_steps=total_steps, **kw)
    if name == "pf_ppo":
        return lambda b, ctx: pf_filter_batch(b, ctx, generator=generator, **kw)
    raise ConfigError(f"selector {name!r} has no wiring in the training loop")


def with_lp_selection(filt: Filter, *, neg_frac: float, pos_frac: float) -> Filter:
    """``filt``, then Lp-Reg's candidates decided once over the kept batch (arXiv:2510.03222):
    the lowest-probability fractions of negative / positive-advantage tokens by ``old_logp``
    among the tokens the loss sees (``loss_mask``, else the completion mask)."""
    def wrapped(batch: LearnerBatch, ctx: SelectContext) -> tuple[LearnerBatch, dict[str, float]]:
        kept, metrics = filt(batch, ctx)
        mask = kept.completion_mask if kept.loss_mask is None else kept.loss_mask  # [N, T]
        pick = lp_reg_selection(kept.old_logp, kept.advantages, mask.float(), neg_frac=neg_frac,
                                pos_frac=pos_frac)  # [N, T] bool
        return replace(kept, lp_select=pick), metrics

    return wrapped
