"""Providers: one per named input a method may read beyond the default loop.

A loss, advantage estimator, KL estimator or selector lists the inputs it reads in its registry
entry (meta ``needs``: a tuple of names, or a function of the method's keyword arguments giving
one). Names the loop always has (``INTRINSIC``) need nothing; every other name is registered here
with the class that computes it. ``tilt.wiring.resolve`` turns the configured methods' needs into
one instance per provider class, once per run; the training loop then calls every instance at
each stage of a step, in this order:

    rollout    after sampling and scoring: inputs of KL-in-reward and the advantage estimator
    advantage  just before the advantage estimator (may read the ``rollout`` outputs)
    batch      after the advantages: inputs of the learner (may read ``data.adv_input``)
    selected   after the batch filter: inputs decided over the kept batch

A stage method returns named tensors, N-major ([N, ...], N = B*G rows, group-major). Outputs
whose name is a field of ``AdvantageInput`` reach the estimator there; other outputs of a
provider the estimator asked for reach it as keywords. Outputs whose name is a ``LearnerBatch``
field reach the learner there; others go to ``LearnerBatch.extras`` (and the loss's
``PolicyLossInput.extras``).

A provider's settings are the keyword-only parameters of its constructor, set through the
keyword arguments of the method that needs it (``loss.kwargs``, ``advantage.kwargs``, ...). A
setting that is also a keyword of the method itself is shared (e.g. spo_chain's
``prob_threshold``); its default is then the method's default.

Providers and per-method state (registry meta ``state``) are ``Component``s: the loop calls
``before_step`` / ``loss_kwargs`` / ``after_update`` on each, and checkpoints them through
``state_dict`` (JSON, in the trainer state) and ``modules`` (weights, in model.safetensors).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.batch import AdvantageInput
from tilt.config import Config, ConfigError
from tilt.registry import Registry
from tilt.rollout import SamplingParams, sequence_logprobs
from tilt.state import Component
from tilt.value_head import ValueHead
from tilt.wiring.sampling import Scored
from tilt.wiring.signals import (RewardsFn, astar_baseline, frozen_logits, gae_returns, policy_probe, process_steps,
                                 spo_values, token_logp)

PROVIDERS: Registry = Registry("provider")

# Inputs the loop always has, per consumer: no provider needed.
INTRINSIC = {
    "loss": {"logp", "old_logp", "advantages", "mask", "rewards", "group_index", "entropy", "logits"},
    "advantage": {"rewards", "mask", "token_ids", "token_rewards"},
    "kl": {"logits"},
    "selector": set(),
}
ASTAR_SEED_OFFSET = 7_919  # the offline V* sampler is seeded apart from the policy's sampler


@dataclass
class Run:
    """What providers may use from the run: models, the sampler's settings, the reward."""

    cfg: Config
    policy: Any  # tilt.model.Policy
    generator: torch.Generator
    params: SamplingParams
    rewards_fn: RewardsFn
    ref_model: Optional[torch.nn.Module] = None  # loaded when a provider requires "ref_model"
    teacher: Optional[torch.nn.Module] = None  # loaded when a provider requires "teacher"
    value_head: Optional[torch.nn.Module] = None  # set by the "values" provider


@dataclass
class StepData:
    """One step's data as it flows through the stages."""

    step: int
    scored: Scored
    outputs: dict[str, Tensor] = field(default_factory=dict)  # provider outputs so far, [N, ...]
    adv_input: Optional[AdvantageInput] = None  # set before the "batch" stage
    batch: Any = None  # the kept LearnerBatch, set before the "selected" stage
    _probe: Any = None

    def probe(self, run: Run):
        """The sampling policy's entropy (and value-head values) at the sampled tokens, one pass per step."""
        if self._probe is None:
            self._probe = policy_probe(run.policy.model, self.scored.rb, temperature=run.cfg.rollout.temperature,
                                       value_head=run.value_head)
        return self._probe


class Provider(Component):
    """Computes named inputs at the stages it defines. ``requires`` names run resources
    ("ref_model", "teacher") the loop loads before constructing it."""

    requires: tuple[str, ...] = ()

    def __init__(self, run: Run, names: frozenset[str]):
        self.run, self.names = run, names

    @classmethod
    def check(cls, cfg: Config, names: frozenset[str], who: str) -> None:
        """Raise ConfigError naming what to set when the config cannot supply these inputs."""

    def rollout(self, data: StepData) -> dict[str, Tensor]:
        return {}

    def advantage(self, data: StepData) -> dict[str, Tensor]:
        return {}

    def batch(self, data: StepData) -> dict[str, Tensor]:
        return {}

    def selected(self, data: StepData) -> dict[str, Tensor]:
        return {}


STAGES = ("rollout", "advantage", "batch", "selected")


def provides(*names: str) -> Callable[[type], type]:
    """Register a Provider class under each input name it computes."""
    def deco(cls: type) -> type:
        for n in names:
            PROVIDERS.register(n)(cls)
        return cls

    return deco


@provides("ref_logp", "ref_logits")
class Reference(Provider):
    """log pi_ref of the sampled tokens [N, T] and, when asked, the full reference logits [N, T, V]."""

    requires = ("ref_model",)

    def rollout(self, data: StepData) -> dict[str, Tensor]:
        rb, cfg = data.scored.rb, self.run.cfg
        if "ref_logits" in self.names:
            logits = frozen_logits(self.run.ref_model, rb, temperature=cfg.rollout.temperature)  # [N, T, V]
            return {"ref_logp": token_logp(logits, rb.completion_ids, rb.completion_mask), "ref_logits": logits}
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(self.run.ref_model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids,
                                            rb.completion_mask, temperature=cfg.rollout.temperature,
                                            chunk_tokens=cfg.train.micro_batch_tokens)  # [N, T]
        return {"ref_logp": ref_logp}


@provides("teacher_logits")
class Teacher(Provider):
    """Teacher-forced logits of the frozen teacher (``teacher.path``), [N, T, V]."""

    requires = ("teacher",)

    @classmethod
    def check(cls, cfg: Config, names: frozenset[str], who: str) -> None:
        if cfg.teacher.path is None:
            raise ConfigError(f"{who} needs teacher logits: set teacher.path "
                              f"(\"shipped\" or a local Hugging Face model directory with the policy's vocabulary)")

    def batch(self, data: StepData) -> dict[str, Tensor]:
        return {"teacher_logits": frozen_logits(self.run.teacher, data.scored.rb,
                                                temperature=self.run.cfg.rollout.temperature)}


@provides("prev_logp")
class PrevPolicy(Provider):
    """log pi_prev [N, T] of a frozen copy of the policy, refreshed before RL steps 1, 1+N, 1+2N, ...
    (HAEPO's pi_prev, catalogue B4); its weights are checkpointed as ``prev_policy``.

    Settings: prev_refresh: N, in RL steps.
    """

    def __init__(self, run: Run, names: frozenset[str], *, prev_refresh: int = 10):
        super().__init__(run, names)
        if prev_refresh < 1:
            raise ConfigError(f"prev_refresh must be >= 1, got {prev_refresh}")
        self.every = prev_refresh
        self.model = copy.deepcopy(run.policy.model).eval().requires_grad_(False)

    def before_step(self, step: int) -> None:
        if (step - 1) % self.every == 0:
            self.model.load_state_dict(self.run.policy.model.state_dict())

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"prev_policy": self.model}

    def batch(self, data: StepData) -> dict[str, Tensor]:
        rb = data.scored.rb
        logits = frozen_logits(self.model, rb, temperature=self.run.cfg.rollout.temperature)  # [N, T, V]
        return {"prev_logp": token_logp(logits, rb.completion_ids, rb.completion_mask)}


@provides("baseline_v")
class OptimalValue(Provider):
    """A*-PO stage 1 (Sec. 3, arXiv:2505.20686): V*(x) = v_star_beta log mean_j exp(r_j / v_star_beta)
    over ``v_star_samples`` completions of pi_ref per prompt, [N] (``astar_baseline``), drawn by a
    sampler seeded apart from the policy's.

    Settings: v_star_samples (M); v_star_beta (the paper's beta_1; None = the method's ``beta``, then
    the fixed point is exact).
    """

    requires = ("ref_model",)

    def __init__(self, run: Run, names: frozenset[str], *, v_star_samples: int = 8,
                 v_star_beta: Optional[float] = None, beta: float = 0.1):
        super().__init__(run, names)
        if v_star_samples < 1 or (v_star_beta is not None and v_star_beta <= 0):
            raise ConfigError(f"v_star_samples must be >= 1 and v_star_beta > 0, got {v_star_samples}, {v_star_beta}")
        self.samples, self.beta = v_star_samples, v_star_beta or beta

    def batch(self, data: StepData) -> dict[str, Tensor]:
        sc, seed = data.scored, self.run.cfg.seed
        gen = torch.Generator().manual_seed(ASTAR_SEED_OFFSET + 1_000_003 * seed + sc.items[0].seed)
        v = astar_baseline(self.run.ref_model, self.run.policy, sc, samples=self.samples, beta=self.beta,
                           params=self.run.params, rewards_fn=self.run.rewards_fn, generator=gen)
        return {"baseline_v": v}


@provides("entropy")
class SamplingEntropy(Provider):
    """Entropy of the sampling policy at each sampled position, [N, T] (0 off the mask)."""

    def rollout(self, data: StepData) -> dict[str, Tensor]:
        return {"entropy": data.probe(self.run).entropy}


@provides("values")
class ValueHeadValues(Provider):
    """A value head on the policy's last hidden states (catalogue C4): V(s_t) [N, T] at rollout, and
    after the advantages its targets R_t = A_t + V(s_t) (Eq. 16, arXiv:1506.02438) with the
    rollout-time predictions; the learner adds value_coef x its (clipped) loss. Checkpointed as
    ``value_head``.

    Settings: value_coef (weight of the value loss); value_clip (clip of the prediction around its
    rollout-time value, PPO value clipping; None = no clipping); gamma, lam (of the GAE targets).
    """

    def __init__(self, run: Run, names: frozenset[str], *, value_coef: float = 0.5,
                 value_clip: Optional[float] = 0.2, gamma: float = 1.0, lam: float = 1.0):
        super().__init__(run, names)
        if value_coef < 0 or (value_clip is not None and value_clip <= 0):
            raise ConfigError(f"value_coef must be >= 0 and value_clip > 0 or None, got {value_coef}, {value_clip}")
        model = run.policy.model
        self.head = ValueHead(model.config.hidden_size).to(next(model.parameters()).dtype)
        run.value_head = self.head
        self.coef, self.clip, self.gamma, self.lam = value_coef, value_clip, gamma, lam

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"value_head": self.head}

    def learner_kwargs(self) -> dict[str, Any]:
        return {"value_head": self.head, "value_coef": self.coef, "value_clip": self.clip}

    def rollout(self, data: StepData) -> dict[str, Tensor]:
        return {"values": data.probe(self.run).values}

    def batch(self, data: StepData) -> dict[str, Tensor]:
        a = data.adv_input
        returns = gae_returns(a.rewards, a.values, a.mask, a.token_rewards, gamma=self.gamma, lam=self.lam)
        return {"returns": returns.flatten(0, 1), "old_values": data.probe(self.run).values}


@provides("step_rewards")
class ProcessSteps(Provider):
    """Per-step process rewards [N, S] and the token closing each step [N, S] from a step-wise task
    (``step_rewards`` / ``step_char_ends``, tilt.tasks.addition_steps); other rows are one step."""

    @classmethod
    def check(cls, cfg: Config, names: frozenset[str], who: str) -> None:
        from tilt.tasks import get_task
        from tilt.tasks.mix import parse_mix

        tasks = {task for task, _, _ in parse_mix(cfg.tasks.mix)}
        if not any(hasattr(get_task(t), "step_rewards") and hasattr(get_task(t), "step_char_ends") for t in tasks):
            raise ConfigError(f"{who} needs per-step process rewards, but the task mix {cfg.tasks.mix!r} has no "
                              f"step-wise task; add one, e.g. tasks.mix=addition_steps:1-2")

    def advantage(self, data: StepData) -> dict[str, Tensor]:
        return process_steps(self.run.policy, data.scored)


@provides("mc_values")
class SegmentValues(Provider):
    """SPO-chain's inputs (arXiv:2505.23564): segment ends [N, S] (tokens drawn with probability <
    ``prob_threshold``), Monte-Carlo values V(prefix) [N, T] from ``continuations`` rollouts of the
    current policy at each end, and the sampling log-probs (``spo_values``).

    Settings: continuations (K); max_segments; prob_threshold (shared with the estimator).
    """

    def __init__(self, run: Run, names: frozenset[str], *, continuations: int = 4, max_segments: int = 4,
                 prob_threshold: float = 0.9):
        super().__init__(run, names)
        if continuations < 1 or max_segments < 1:
            raise ConfigError(f"continuations and max_segments must be >= 1, got {continuations}, {max_segments}")
        self.k, self.max_segments, self.threshold = continuations, max_segments, prob_threshold

    def advantage(self, data: StepData) -> dict[str, Tensor]:
        out = spo_values(self.run.policy, data.scored, params=self.run.params, k=self.k, threshold=self.threshold,
                         max_segments=self.max_segments, rewards_fn=self.run.rewards_fn,
                         generator=self.run.generator)
        return {**out, "logprobs": data.scored.rb.logprobs}


@provides("lp_select")
class LowProbabilitySelection(Provider):
    """Lp-Reg's candidate tokens (catalogue A6, arXiv:2510.03222), [N, T] bool, decided once over the
    kept batch: the lowest-probability ``neg_frac`` / ``pos_frac`` of the negative / positive-
    advantage tokens by the sampling policy's log-probs, among the tokens the loss sees, so
    splitting into micro-batches cannot change the choice. Settings shared with the loss."""

    def __init__(self, run: Run, names: frozenset[str], *, neg_frac: float = 0.01, pos_frac: float = 0.0):
        super().__init__(run, names)
        self.neg_frac, self.pos_frac = neg_frac, pos_frac

    def selected(self, data: StepData) -> dict[str, Tensor]:
        from tilt.losses.regularizers import lp_reg_selection

        b = data.batch
        mask = b.completion_mask if b.loss_mask is None else b.loss_mask  # [N, T]
        return {"lp_select": lp_reg_selection(b.old_logp, b.advantages, mask.float(), neg_frac=self.neg_frac,
                                              pos_frac=self.pos_frac)}
