"""Inputs from frozen models: the reference (log pi_ref, its logits), the teacher (distillation),
HAEPO's previous policy pi_prev, and the learner's own log-probs of the sampled tokens (for a
training-inference correction). No gradient flows through here.

Shapes: N = B*G rows (group-major), T completion tokens, V vocabulary.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from tilt.batch import RolloutBatch
from tilt.config import Config, ConfigError
from tilt.learner import completion_forward
from tilt.model import load_policy, reference_model
from tilt.providers import Provider, Run, StepData, provides
from tilt.rollout import model_device, sequence_logprobs
from tilt.token_logprobs import token_logprobs


def load_reference(cfg: Config, policy, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen reference policy pi_ref: the starting policy's weights loaded again, or (LoRA) the
    policy's own module with its adapters disabled, one copy of the base weights (tilt.model.reference_model)."""
    return reference_model(policy, cfg.model)


def load_teacher(cfg: Config, policy, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen teacher of ``teacher.path``; ConfigError unless it shares the policy's vocabulary."""
    teacher = load_policy(cfg.teacher.path, dtype=dtype, device=model_device(policy.model))
    if teacher.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ConfigError(f"teacher.path {cfg.teacher.path!r} has a different vocabulary than the policy "
                          f"{cfg.model.path!r}; distillation compares logits token by token")
    return teacher.model.requires_grad_(False)


# run resources a provider may require -> loader(cfg, policy, dtype), loaded once by the trainer
RESOURCES = {"ref_model": load_reference, "teacher": load_teacher}


@torch.no_grad()
def frozen_logits(model, rb: RolloutBatch, *, temperature: float) -> Tensor:
    """Teacher-forced logits [N, T, V] of a frozen model (reference, teacher, pi_prev) / temperature."""
    return completion_forward(model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids, rb.completion_mask,
                              temperature=temperature)[0]


def token_logp(logits: Tensor, token_ids: Tensor, mask: Tensor) -> Tensor:
    """log softmax(logits)[y_t] at the sampled tokens, [N, T, V] -> [N, T], 0 off the mask."""
    return token_logprobs(logits, token_ids)[0] * mask



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
                                            chunk_tokens=self.run.chunk_tokens)  # [N, T]
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


@provides("learner_logp")
class LearnerLogProbs(Provider):
    """The learner's own log-probs of the sampled tokens (catalogue A8): a no-grad teacher-forced pass of
    the policy after sampling. They become the batch's ``old_logp`` (the behaviour policy of the loss),
    and the sampler's log-probs move to ``sampler_logp`` for the correction (tilt.corrections).

    When the update is exactly on-policy (``train.epochs == 1`` and ``train.minibatches == 1``: one
    optimizer step on the whole batch, so every micro-batch's forward runs the weights that sampled
    it), that pass is skipped: the learner's own forward already computes log pi_old, and the learner
    takes ``old_logp = logp.detach()`` from it (``Learner(old_logp_from_forward=True)``). Same numbers
    (tests/test_corrections.py), one teacher-forced pass fewer. Until the update, the batch's
    ``old_logp`` then holds the sampler's log-probs (only Lp-Reg's candidate choice reads it there)."""

    def __init__(self, run: Run, names: frozenset[str]):
        super().__init__(run, names)
        train = run.cfg.train
        self.on_policy = train.epochs == 1 and train.minibatches == 1

    def learner_kwargs(self) -> dict[str, Any]:
        return {"old_logp_from_forward": True} if self.on_policy else {}

    def batch(self, data: StepData) -> dict[str, Tensor]:
        rb, cfg = data.scored.rb, self.run.cfg
        if self.on_policy:
            return {"sampler_logp": rb.logprobs}
        with torch.no_grad():
            logp, _ = sequence_logprobs(self.run.policy.model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids,
                                        rb.completion_mask, temperature=cfg.rollout.temperature,
                                        chunk_tokens=self.run.chunk_tokens)  # [N, T]
        return {"old_logp": logp * rb.completion_mask, "sampler_logp": rb.logprobs}
