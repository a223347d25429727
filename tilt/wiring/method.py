"""Choose, once per run, the stages the configured method adds to the default loop.

``wire_method`` fills the method-specific slots of ``tilt.trainer.Parts``: how a step's groups
are drawn (plain or DAPO dynamic sampling), the rollout-time probe of the policy, the advantage
and learner stages, the batch filter and the cross-step hooks. On the default path every slot
keeps its no-op default, so the loop runs exactly as without this module.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from tilt.config import Config, ConfigError
from tilt.losses import LOSSES
from tilt.model import load_policy
from tilt.rewards import score
from tilt.rollout import SamplingParams, model_device
from tilt.wiring.hooks import AERController, LoopHooks, PrevPolicy
from tilt.wiring.sampling import Scored, dynamic_sampling, sample_scored
from tilt.wiring.selection import make_filter, selector_kwargs, with_lp_selection
from tilt.wiring.signals import policy_probe
from tilt.wiring.stages import kwarg, make_stages


def wire_method(parts, cfg: Config, teacher: Optional[torch.nn.Module]) -> None:
    """Choose the sampler, probe, stages, filter and hooks of the configured method (once)."""
    pol, needs, gen = parts.policy, parts.needs, parts.generator
    params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                            min_new_tokens=cfg.rollout.min_new_tokens)
    draw = partial_draw(parts, cfg, params)
    B = cfg.rollout.prompts_per_step
    if cfg.selection.name == "dynamic_sampling":
        kw = selector_kwargs("dynamic_sampling", cfg.selection.kwargs)
        parts.sample = lambda stream: dynamic_sampling(lambda n: draw(stream.take(n)), batch_size=B,
                                                       pad_id=pol.pad_id, **kw)
    else:
        parts.sample = lambda stream: (draw(stream.take(B)), {})
    if needs.probe:
        parts.probe = lambda sc: policy_probe(pol.model, sc.rb, temperature=cfg.rollout.temperature,
                                              value_head=parts.value_head)
    prev = PrevPolicy(pol.model, every=cfg.loss.prev_refresh) if needs.prev_logp else None
    parts.prev_model = prev.model if prev is not None else None
    aer = None
    if needs.aer:
        alpha0 = cfg.loss.kwargs.get("alpha", inspect.signature(LOSSES.get("aer")).parameters["alpha"].default)
        aer = AERController(alpha=alpha0, tau=cfg.loss.aer_tau, lr=cfg.loss.aer_lr, alpha_max=cfg.loss.aer_alpha_max)
    parts.hooks = LoopHooks(pol.model, prev=prev, aer=aer)

    def rewards_fn(prompts: list[str], texts: list[str], columns: dict) -> torch.Tensor:
        r, _, _ = score(parts.reward_fns, parts.reward_weights, prompts, texts, columns, timeout=cfg.reward.timeout_s)
        return torch.tensor(r, dtype=torch.float32)

    parts.stages = make_stages(cfg, needs, policy=pol, ref_model=parts.ref_model, teacher=teacher, prev=prev,
                               rewards_fn=rewards_fn, generator=gen)
    parts.select = make_filter(cfg.selection.name, cfg.selection.kwargs, total_steps=cfg.train.steps, generator=gen)
    if needs.lp_select:  # Lp-Reg ranks its tokens once per batch, not per micro-batch
        lp = LOSSES.get("lp_reg")
        parts.select = with_lp_selection(parts.select, neg_frac=kwarg(lp, cfg.loss.kwargs, "neg_frac"),
                                         pos_frac=kwarg(lp, cfg.loss.kwargs, "pos_frac"))


def partial_draw(parts, cfg: Config, params: SamplingParams) -> Callable[[list], Scored]:
    """items -> their G sampled and scored completions each."""
    def score_fn(prompts, texts, columns):
        return score(parts.reward_fns, parts.reward_weights, prompts, texts, columns, timeout=cfg.reward.timeout_s)

    return lambda items: sample_scored(parts.policy, items, group_size=cfg.rollout.group_size, params=params,
                                       generator=parts.generator, score_fn=score_fn)


def load_teacher(cfg: Config, policy, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen teacher of ``teacher.path``; ConfigError unless it shares the policy's vocabulary."""
    teacher = load_policy(cfg.teacher.path, dtype=dtype, device=model_device(policy.model))
    if teacher.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ConfigError(f"teacher.path {cfg.teacher.path!r} has a different vocabulary than the policy "
                          f"{cfg.model.path!r}; distillation compares logits token by token")
    return teacher.model.requires_grad_(False)
