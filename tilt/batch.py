"""The plain data that crosses component boundaries: rollout -> reward -> learner.

Everything here is a dataclass of tensors; nothing holds a model or global state, so a
rollout worker and a learner can live in different processes (Ray) and exchange these.
Shapes: N = number of sequences (B prompts x G completions), P = prompt length,
T = completion length, V = vocabulary size.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """What the rollout component returns for a batch of prompts.

    Prompts are left-padded, completions right-padded. ``logprobs`` are log-probabilities
    of the sampled tokens under the sampling distribution softmax(logits / temperature)
    (top-p truncation is not reflected, as in TRL and verl).
    """

    prompt_ids: Tensor  # [N, P] long, left-padded with pad id
    prompt_mask: Tensor  # [N, P] long, 1 = real prompt token
    completion_ids: Tensor  # [N, T] long, right-padded with pad id
    completion_mask: Tensor  # [N, T] long, 1 = generated token (EOS included), 0 after it
    logprobs: Tensor  # [N, T] float, 0 where completion_mask == 0

    def to(self, device: str | torch.device) -> "RolloutBatch":
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class PolicyLossInput:
    """Everything a policy loss may read, per token of the completions.

    ``logp`` carries gradient; every other field is detached data. Optional fields are
    filled by the learner only when the selected loss declares it needs them.
    """

    logp: Tensor  # [N, T] log pi_theta(y_t | x, y_<t)
    old_logp: Tensor  # [N, T] log pi_old (the sampling policy)
    advantages: Tensor  # [N, T]
    mask: Tensor  # [N, T] float, 1 = completion token
    ref_logp: Optional[Tensor] = None  # [N, T] log pi_ref
    rewards: Optional[Tensor] = None  # [N] sequence rewards
    group_index: Optional[Tensor] = None  # [N] long, which prompt group each sequence is in
    entropy: Optional[Tensor] = None  # [N, T] entropy of pi_theta at each position (may carry grad)
    logits: Optional[Tensor] = None  # [N, T, V] pi_theta logits (carry grad)
    ref_logits: Optional[Tensor] = None  # [N, T, V] pi_ref logits
    teacher_logits: Optional[Tensor] = None  # [N, T, V] teacher logits (distillation)
    prev_logp: Optional[Tensor] = None  # [N, T] log pi_prev of a frozen previous policy (HAEPO)
    baseline_v: Optional[Tensor] = None  # [N] offline V*(x) (A*-PO stage 1)
    lp_select: Optional[Tensor] = None  # [N, T] bool, Lp-Reg candidates decided once over the whole batch
    extras: dict[str, Tensor] = field(default_factory=dict)  # inputs of providers registered outside tilt, by name


@dataclass
class AdvantageInput:
    """Everything an advantage estimator may read. B prompts x G completions x T tokens."""

    rewards: Tensor  # [B, G] float outcome rewards
    mask: Tensor  # [B, G, T] float, 1 = completion token
    step_rewards: Optional[Tensor] = None  # [B, G, S] process rewards per step (NaN = no step)
    step_ends: Optional[Tensor] = None  # [B, G, S] long, index of the token that closes step s (-1 = none)
    token_ids: Optional[Tensor] = None  # [B, G, T] long completion tokens (prefix trees)
    entropy: Optional[Tensor] = None  # [B, G, T] per-token entropy of the sampling policy
    values: Optional[Tensor] = None  # [B, G, T] value-head predictions V(s_t)
    token_rewards: Optional[Tensor] = None  # [B, G, T] per-token rewards (e.g. KL placed in reward)
