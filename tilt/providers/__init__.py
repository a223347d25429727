"""Provider registry: one provider class per named input a method may read beyond the default loop.

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

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.batch import AdvantageInput
from tilt.config import Config
from tilt.registry import Registry
from tilt.rollout import SamplingParams
from tilt.state import Component
from tilt.wiring.sampling import Scored

PROVIDERS: Registry = Registry("provider")
RewardsFn = Callable[[list[str], list[str], dict[str, list[Any]]], Tensor]  # -> [n] rewards

# Inputs the loop always has, per consumer: no provider needed.
INTRINSIC = {
    "loss": {"logp", "old_logp", "advantages", "mask", "rewards", "group_index", "entropy", "logits"},
    "advantage": {"rewards", "mask", "token_ids", "token_rewards"},
    "kl": {"logits", "old_logp", "mask"},
    "selector": set(),
    "correction": set(),
}


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
    chunk_tokens: Optional[int] = None  # train.micro_batch_tokens resolved for this model ("auto" -> a number)


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
            from tilt.providers.probe import policy_probe

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



for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
