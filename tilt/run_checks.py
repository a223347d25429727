"""Checks of a config's batch shape that a field validator cannot make alone (issue 16 case 10).

- ``train.minibatches`` larger than the rows a batch has is an error: each optimizer step needs a
  row, so the run would take fewer optimizer steps than the learning-rate schedule assumes
  (train.steps x train.epochs x train.minibatches).
- ``rollout.group_size = 1`` with a group-relative advantage is a *warning*, not an error: such an
  estimator (A_i = r_i - mean_g r, and its relatives) gives every completion advantage 0 when a
  group has one completion, so the policy-gradient term vanishes; but losses that do not read the
  advantages (A*-PO regresses on r - V*, supervised and distillation losses) legitimately run with
  G = 1, and a loss does not declare whether it reads them. Which estimators are group-relative is
  measured, not listed: the estimator is run on two one-completion groups with rewards 1 and 0, and
  is group-relative if every advantage it returns is 0 or not finite, or if it refuses the input.
"""
from __future__ import annotations

import functools

import torch

from tilt.batch import AdvantageInput
from tilt.config import Config, ConfigError


def batch_rows(cfg: Config) -> int:
    """Rows one batch splits into minibatches: completions (by row) or groups (by group)."""
    B, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    return B * G if cfg.train.minibatch_by == "row" else B


def zero_at_one_completion_per_group(name: str, kwargs: dict) -> bool:
    """True if advantage estimator ``name`` gives no signal when each group holds one completion."""
    from tilt.advantages import ADVANTAGES
    from tilt.wiring.resolve import keyword_params

    entry = ADVANTAGES.entry(name)
    if set(entry.needs(kwargs)) - {"token_ids"}:
        return False  # needs values / process rewards: not measurable here, and not group-relative by form
    own = keyword_params(entry.fn)  # the estimator's own keywords (others configure its providers)
    fn = functools.partial(entry.fn, **{k: v for k, v in kwargs.items() if k in own})
    inp = AdvantageInput(rewards=torch.tensor([[1.0], [0.0]]), mask=torch.ones(2, 1, 3),
                         token_ids=torch.tensor([[[5, 6, 7]], [[5, 6, 8]]]))  # B=2 groups of G=1, T=3
    try:
        adv, _ = fn(inp)
    except (ValueError, ZeroDivisionError, RuntimeError):
        return True
    return not bool((torch.isfinite(adv) & (adv != 0)).any())


def check_batch_shape(cfg: Config) -> list[str]:
    """ConfigError for a batch shape that cannot work; warnings (returned) for one that learns nothing."""
    rows = batch_rows(cfg)
    if cfg.train.minibatches > rows:
        unit = "rows" if cfg.train.minibatch_by == "row" else "groups"
        raise ConfigError(
            f"train.minibatches={cfg.train.minibatches} exceeds the {rows} {unit} of a batch "
            f"(rollout.prompts_per_step={cfg.rollout.prompts_per_step} x rollout.group_size="
            f"{cfg.rollout.group_size}, train.minibatch_by={cfg.train.minibatch_by!r}); the run would take "
            "fewer optimizer steps than the learning-rate schedule assumes. "
            f"Set train.minibatches to at most {rows}.")
    notes = []
    if cfg.rollout.group_size == 1 and zero_at_one_completion_per_group(cfg.advantage.name, cfg.advantage.kwargs):
        notes.append(
            f"rollout.group_size=1 with the group-relative advantage {cfg.advantage.name!r}: every advantage "
            "is 0 (or undefined), so the policy-gradient term learns nothing. Use rollout.group_size >= 2, "
            "or an advantage that is not group-relative (e.g. reinforce_pp), unless your loss does not read "
            "the advantages.")
    return notes
