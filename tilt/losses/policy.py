"""The peers' standard policy losses (catalogue B1): REINFORCE, PPO-clip, GRPO, DAPO, Dr. GRPO, GSPO.

Names, defaults and reductions follow TRL 1.16 ``GRPOConfig.loss_type`` (trl/trainer/grpo_config.py
L237-L265, trl/trainer/grpo_trainer.py ``_compute_loss`` L3020-L3185) and verl 0.9.1
(verl/trainer/ppo/core_algos.py), so a config can be ported by name. Where TRL's defaults differ
from verl's we follow TRL and say so.

Every loss here is the policy-gradient part only. The KL regulariser (e.g. beta * k3 per token,
``tilt.kl.kl_penalty(placement="loss")``) is added by the learner with ``kl.beta``: the GRPO of
the paper (Eq. 3, arXiv:2402.03300) is ``grpo`` + the k3 term; TRL 1.16 adds it at
grpo_trainer.py L3149-L3150 before reducing.

This module also holds the small masked-sequence helpers the other loss modules share.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.reduction import masked_mean

Metrics = dict[str, Tensor]


# ---------------------------------------------------------------- shared helpers


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is set, exactly 0 elsewhere (garbage in padding never leaks)."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum over the completion tokens of each sequence. [N, T] -> [N]."""
    return masked(x, mask).sum(-1)


def seq_len(mask: Tensor) -> Tensor:
    """Number of completion tokens per sequence, at least 1. [N, T] -> [N]."""
    m = mask if mask.is_floating_point() else mask.float()
    return m.sum(-1).clamp(min=1.0)


def seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the completion tokens of each sequence. [N, T] -> [N]."""
    return seq_sum(x, mask) / seq_len(mask).to(x.dtype)


def spread(values: Tensor, mask: Tensor) -> Tensor:
    """Spread a per-sequence value [N] over its tokens [N, T] so the token sum is the value.

    With the ``seq-mean-token-sum`` reduction this gives mean_i values_i: how sequence-level
    losses (A*-PO, PACS, HAEPO) enter the per-token interface.
    """
    per_tok = values[:, None] / seq_len(mask).to(values.dtype)[:, None]  # [N, T]
    return masked(per_tok.expand(mask.shape), mask)  # [N, T]


def group_sum(values: Tensor, group_index: Tensor) -> Tensor:
    """Sum of ``values`` [N] over each sequence's group, returned per sequence [N]."""
    n_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    totals = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    return totals.index_add(0, group_index, values)[group_index]  # [N]


def group_mean(values: Tensor, group_index: Tensor) -> Tensor:
    """Unweighted mean of ``values`` [N] over each sequence's group (sampled groups), [N]."""
    ones = torch.ones_like(values)
    return group_sum(values, group_index) / group_sum(ones, group_index)


def clipped_surrogate(ratio: Tensor, adv: Tensor, *, eps_low: float, eps_high: float,
                      delta: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate -min(r A, clip(r, 1-eps_low, 1+eps_high) A) and where clipping binds.

    Eq. 7, arXiv:1707.06347 (asymmetric bounds: Eq. 10, arXiv:2503.14476). TRL 1.16
    grpo_trainer.py L3113-L3120. ``delta`` (two-sided clipping, INTELLECT-2 arXiv:2505.07291,
    TRL ``GRPOConfig.delta``) caps the unclipped ratio too: -min(min(r, delta) A, clip(r) A),
    which bounds the loss of negative-advantage tokens whose ratio has exploded.
    Returns:
        (per_token_loss [N, T], clipped [N, T] bool: the clipped branch is the one taken and it
        differs from the unclipped one, i.e. (r > 1+eps_high and A > 0) or (r < 1-eps_low and A < 0)).
    """
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    unclipped = ratio if delta is None else ratio.clamp(max=delta)  # [N, T]
    loss = -torch.minimum(unclipped * adv, clipped_ratio * adv)  # [N, T]
    binds = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))  # [N, T]
    return loss, binds


def log_importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, *, level: str = "token") -> Tensor:
    """log pi/pi_old per token ("token") or its per-sequence mean spread over the tokens ("sequence").

    The sequence form is GSPO's s_i = exp(mean_t log pi/pi_old) (Eq. 7, arXiv:2507.18071) with the
    gradient flowing through the mean, as TRL 1.16 ``importance_sampling_level="sequence"``
    (grpo_trainer.py L3085-L3093). [N, T] -> [N, T].
    """
    log_ratio = masked(logp - old_logp, mask)  # [N, T]
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked(seq_mean(log_ratio, mask)[:, None].expand_as(log_ratio), mask)  # [N, T]
    raise ValueError(f"unknown importance-sampling level {level!r}; valid: 'token', 'sequence'")


def clipped_pg(inp: PolicyLossInput, *, eps_low: float, eps_high: float, level: str = "token",
               delta: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """Clipped policy gradient shared by ppo_clip / grpo / dapo / dr_grpo / bnpo / luspo.

    ``level`` is TRL's ``importance_sampling_level`` (``log_importance_ratio``); ``delta`` its
    two-sided clipping (``clipped_surrogate``).
    """
    mask = inp.mask
    ratio = torch.exp(log_importance_ratio(inp.logp, inp.old_logp, mask, level=level))  # [N, T]
    loss, binds = clipped_surrogate(ratio, masked(inp.advantages, mask), eps_low=eps_low, eps_high=eps_high,
                                    delta=delta)
    metrics = {
        "clip/frac": masked_mean(binds.to(ratio.dtype), mask).detach(),
        "ratio/mean": masked_mean(ratio, mask).detach(),
    }
    return masked(loss, mask), metrics


# ---------------------------------------------------------------- registered losses


@LOSSES.register("reinforce", reduction="seq-mean-token-sum", needs=())
def reinforce(inp: PolicyLossInput) -> tuple[Tensor, Metrics]:
    """REINFORCE: -A_t log pi(y_t), no ratio (Williams 1992; verl ``compute_policy_loss_reinforce``).

    Summing over tokens (``seq-mean-token-sum``, verl's default for this loss) makes the
    gradient the sequence score function E[A grad log pi(y|x)].
    Returns:
        (per_token_loss [N, T], {"ratio/mean"}).
    """
    mask = inp.mask
    loss = -masked(inp.advantages, mask) * masked(inp.logp, mask)  # [N, T]
    ratio = torch.exp(masked(inp.logp - inp.old_logp, mask))  # [N, T]
    return masked(loss, mask), {"ratio/mean": masked_mean(ratio, mask).detach()}


@LOSSES.register("ppo_clip", reduction="token-mean", needs=())
def ppo_clip(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Eq. 7, arXiv:1707.06347), token-mean as verl's default ``loss_agg_mode``.

    verl's ``vanilla`` loss adds dual clipping (clip_ratio_c=3.0, arXiv:1912.09729) for A < 0;
    TRL does not, and neither do we.
    """
    return clipped_pg(inp, eps_low=eps_low, eps_high=eps_high)


@LOSSES.register("grpo", reduction="seq-mean-token-mean", needs=())
def grpo(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2, level: str = "token",
         delta: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """GRPO surrogate (Eq. 3, arXiv:2402.03300) as TRL 1.16 ``loss_type="grpo"``.

    Per-sequence token mean, then mean over sequences (grpo_trainer.py L3153-L3154). TRL's
    epsilon defaults to 0.2 with epsilon_high = epsilon (grpo_config.py L693, L705; trainer
    L945-L946). The paper's KL term beta * k3 is added by the learner (module docstring).
    ``level`` / ``delta``: TRL's ``importance_sampling_level`` / ``delta`` (``clipped_pg``).
    """
    return clipped_pg(inp, eps_low=eps_low, eps_high=eps_high, level=level, delta=delta)


@LOSSES.register("dapo", reduction="token-mean", needs=())
def dapo(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.28, level: str = "token",
         delta: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """DAPO: clip-higher (Eq. 10, arXiv:2503.14476) and token-mean over the whole batch.

    TRL 1.16 ``loss_type="dapo"`` divides the token sum by the number of completion tokens of
    the generation batch (grpo_trainer.py L3168-L3173). eps_high = 0.28 is the DAPO paper's
    value (TRL's docs recommend it; TRL's and verl's defaults leave it at 0.2).
    """
    return clipped_pg(inp, eps_low=eps_low, eps_high=eps_high, level=level, delta=delta)


@LOSSES.register("dr_grpo", reduction="seq-mean-token-sum-norm", needs=())
def dr_grpo(inp: PolicyLossInput, *, eps_low: float = 0.2, eps_high: float = 0.2, level: str = "token",
            delta: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """Dr. GRPO (Sec. 3.2, arXiv:2503.20783): token sum / (N * max_completion_length).

    TRL 1.16 grpo_trainer.py L3163-L3164; the learner passes L_max as ``max_len`` to
    ``reduction_denominator``. (The "no std normalisation" half lives in the advantage
    estimator.) verl calls this ``seq-mean-token-sum-norm``.
    """
    return clipped_pg(inp, eps_low=eps_low, eps_high=eps_high, level=level, delta=delta)


@LOSSES.register("gspo", reduction="seq-mean-token-mean", needs=())
def gspo(inp: PolicyLossInput, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, Metrics]:
    """GSPO with the sequence ratio s_i = exp(mean_t log pi/pi_old) (Eq. 7, arXiv:2507.18071).

    Token form GSPO-token (Eq. 13 ibid.): s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)], equal in value
    to s_i, so per-token advantages are allowed and, when A is constant in a sequence, the
    gradient equals sequence-level GSPO (TRL ``importance_sampling_level="sequence"``,
    grpo_trainer.py L3086-L3088; verl ``compute_policy_loss_gspo``). Clip range 3e-4 / 4e-4 as
    in the paper and the TRL/verl GSPO recipes; reduction seq-mean-token-mean as both.
    """
    mask = inp.mask
    logp = masked(inp.logp, mask)  # [N, T]
    log_s = seq_mean(logp - masked(inp.old_logp, mask), mask)  # [N]
    log_s_tok = log_s.detach()[:, None] + logp - logp.detach()  # [N, T]
    ratio = torch.exp(log_s_tok)  # [N, T], value s_i on every token
    loss, binds = clipped_surrogate(ratio, masked(inp.advantages, mask), eps_low=eps_low, eps_high=eps_high)
    metrics = {
        "clip/frac": masked_mean(binds.to(ratio.dtype), mask).detach(),
        "ratio/mean": torch.exp(log_s).mean().detach(),
    }
    return masked(loss, mask), metrics
