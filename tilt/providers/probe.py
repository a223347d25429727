"""The sampling policy at its own samples: entropy and value-head values (one no-grad pass per
step), and the value head's GAE targets.

Shapes: N = B*G rows (group-major), T completion tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from tilt.advantages.common import outcome_token_rewards
from tilt.advantages.gae import gae_advantages_returns
from tilt.batch import RolloutBatch
from tilt.config import ConfigError
from tilt.providers import Provider, Run, StepData, provides
from tilt.rollout import completion_logits, model_device
from tilt.token_logprobs import token_logprobs
from tilt.value_head import ValueHead


@dataclass
class Probe:
    """The sampling policy at the sampled tokens, from one no-grad teacher-forced pass."""

    entropy: Optional[Tensor] = None  # [N, T] H(pi(.|s_t)) at the rollout temperature, 0 off the mask
    values: Optional[Tensor] = None  # [N, T] value-head V(s_t), 0 off the mask


@torch.no_grad()
def policy_probe(model, rb: RolloutBatch, *, temperature: float, value_head=None) -> Probe:
    """Entropy of the sampling policy and (with a head) V(s_t) on the policy's last hidden states."""
    model.eval()
    logits, hidden = completion_logits(model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids,
                                       rb.completion_mask, hidden=value_head is not None)  # [N, T, V], [N, T, H]
    model.train()
    m = rb.completion_mask.float()  # [N, T]
    entropy = token_logprobs(logits, rb.completion_ids, temperature=temperature, entropy=True)[1] * m  # [N, T]
    values = None
    if value_head is not None:
        p = next(value_head.parameters())
        values = value_head(hidden.to(p.device, p.dtype)).float().to(m.device) * m  # [N, T]
    return Probe(entropy=entropy, values=values)


def gae_returns(rewards: Tensor, values: Tensor, mask: Tensor, token_rewards: Optional[Tensor], *,
                gamma: float, lam: float) -> Tensor:
    """Value-head targets R_t = A_t + V(s_t) before whitening (Eq. 16, arXiv:1506.02438), [B, G, T];
    the same dense reward as the ``gae`` estimator (outcome at the last token + token_rewards)."""
    dense = outcome_token_rewards(rewards, mask, token_rewards)  # [B, G, T]
    return gae_advantages_returns(dense, values, mask, gamma=gamma, lam=lam)[1]


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
        self.head = ValueHead(model.config.hidden_size).to(model_device(model), next(model.parameters()).dtype)
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
