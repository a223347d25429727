"""The method-specific stages of one RL step, chosen once from the resolved ``Needs``.

    advantage stages  (sc, probe) -> fields of AdvantageInput, [N, ...] (the loop reshapes to
                      [B, G, ...]); a key that is not an AdvantageInput field is passed to the
                      estimator as a keyword (spo_chain's ``logprobs``)
    learner stages    (sc, probe, adv_input) -> fields of LearnerBatch, [N, ...]

Each stage is a small closure over the models and settings it needs; the default path has none.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.batch import AdvantageInput
from tilt.config import Config
from tilt.losses import LOSSES
from tilt.rollout import SamplingParams
from tilt.wiring.needs import Needs
from tilt.wiring.sampling import Scored
from tilt.wiring.signals import (Probe, RewardsFn, astar_baseline, frozen_logits, gae_returns, process_steps,
                                 spo_values, token_logp)

AdvStage = Callable[[Scored, Probe], dict[str, Tensor]]
LearnStage = Callable[[Scored, Probe, AdvantageInput], dict[str, Tensor]]
ASTAR_SEED_OFFSET = 7_919  # the offline V* sampler is seeded apart from the policy's sampler


@dataclass
class Stages:
    advantage: list[AdvStage] = field(default_factory=list)
    learner: list[LearnStage] = field(default_factory=list)


def kwarg(fn: Callable, kwargs: dict[str, Any], name: str) -> Any:
    """``kwargs[name]`` if configured, else the default of ``fn``'s keyword ``name``."""
    return kwargs.get(name, inspect.signature(fn).parameters[name].default)


def make_stages(cfg: Config, needs: Needs, *, policy, ref_model=None, teacher=None, prev=None,
                rewards_fn: RewardsFn, generator: torch.Generator) -> Stages:
    """The stages the configured method needs (see module docstring)."""
    st, temp = Stages(), cfg.rollout.temperature
    params = SamplingParams(cfg.rollout.max_new_tokens, temp, cfg.rollout.top_p)
    adv_fn, adv_kw = ADVANTAGES.get(cfg.advantage.name), cfg.advantage.kwargs
    if needs.entropy:
        st.advantage.append(lambda sc, probe: {"entropy": probe.entropy})
    if needs.values:
        st.advantage.append(lambda sc, probe: {"values": probe.values})
    if needs.steps:
        st.advantage.append(lambda sc, probe: process_steps(policy, sc))
    if needs.spo:
        threshold = kwarg(adv_fn, adv_kw, "prob_threshold")
        st.advantage.append(lambda sc, probe: {
            **spo_values(policy, sc, params=params, k=cfg.advantage.mc_continuations, threshold=threshold,
                         max_segments=cfg.advantage.spo_segments, rewards_fn=rewards_fn, generator=generator),
            "logprobs": sc.rb.logprobs})
    if needs.values:
        gamma, lam = kwarg(adv_fn, adv_kw, "gamma"), kwarg(adv_fn, adv_kw, "lam")
        st.learner.append(lambda sc, probe, ainp: {
            "returns": gae_returns(ainp.rewards, ainp.values, ainp.mask, ainp.token_rewards, gamma=gamma,
                                   lam=lam).flatten(0, 1), "old_values": probe.values})
    if needs.teacher:
        st.learner.append(lambda sc, probe, ainp: {"teacher_logits": frozen_logits(teacher, sc.rb, temperature=temp)})
    if needs.prev_logp:
        st.learner.append(lambda sc, probe, ainp: {"prev_logp": token_logp(
            frozen_logits(prev.model, sc.rb, temperature=temp), sc.rb.completion_ids, sc.rb.completion_mask)})
    if needs.baseline_v:
        beta = cfg.loss.astar_beta or kwarg(LOSSES.get("astar_po"), cfg.loss.kwargs, "beta")
        st.learner.append(lambda sc, probe, ainp: {"baseline_v": astar_baseline(
            ref_model, policy, sc, samples=cfg.loss.astar_samples, beta=beta, params=params,
            rewards_fn=rewards_fn, generator=torch.Generator().manual_seed(
                ASTAR_SEED_OFFSET + 1_000_003 * cfg.seed + sc.items[0].seed))})
    return st


def run_advantage_stages(stages: list[AdvStage], sc: Scored, probe: Probe) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(AdvantageInput fields reshaped to [B, G, ...], estimator keywords [B, G, ...])."""
    B, G = len(sc.items), sc.group_size
    fields_, kwargs = {}, {}
    names = set(AdvantageInput.__dataclass_fields__)
    for stage in stages:
        for k, v in stage(sc, probe).items():
            (fields_ if k in names else kwargs)[k] = v.view(B, G, *v.shape[1:])
    return fields_, kwargs


def run_learner_stages(stages: list[LearnStage], sc: Scored, probe: Probe, ainp: AdvantageInput
                       ) -> dict[str, Optional[Tensor]]:
    out: dict[str, Optional[Tensor]] = {}
    for stage in stages:
        out.update(stage(sc, probe, ainp))
    return out
