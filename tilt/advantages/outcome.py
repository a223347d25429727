"""Outcome-reward advantage estimators of the peers (catalogue C1): GRPO, Dr. GRPO, RLOO,
REINFORCE++ and REINFORCE++-baseline. GAE with a value model lives in ``gae.py``.

Each takes the sequence rewards [B, G] of B prompts x G completions and returns per-token
advantages [B, G, T] (0 off the mask) plus metrics, see ``tilt.advantages``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import (finish, leave_one_out_mean, masked_whiten,
                                    outcome_token_rewards, per_token)
from tilt.batch import AdvantageInput

SCALE_MODES = ("group", "batch", "none")


def group_normalised(rewards: Tensor, *, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's sequence advantage [B, G]: (r - mean_g r) / (std + eps).

    As TRL ``GRPOTrainer._generate_and_score_completions`` (trl/trainer/grpo_trainer.py):
    the mean is always the group's; ``scale_rewards`` picks the std: "group" (per prompt),
    "batch" (all B*G rewards) or "none" (no division: Dr. GRPO, arXiv:2503.20783 Sec. 3.2).
    torch.std is unbiased (divides by n - 1); with a single reward the std is taken as 0.
    Eq. of GRPO: A_i = (r_i - mean(r)) / std(r), arXiv:2402.03300 Sec. 4.1.2.
    """
    B, G = rewards.shape
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [B, G]
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        zero = torch.zeros_like(rewards[:, :1])
        std = rewards.std(dim=1, keepdim=True) if G > 1 else zero  # [B, 1]
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)  # []
    else:
        valid = ", ".join(SCALE_MODES)
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {valid}")
    return centred / (std + eps)


@ADVANTAGES.register("grpo", needs=(), optional=())
def grpo(inp: AdvantageInput, *, scale_rewards: str = "group", eps: float = 1e-4
         ) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO: A_i = (r_i - mean_g r) / (std_g r + eps) on every token of completion i.

    Args:
        scale_rewards: "group" | "batch" | "none" (TRL's ``scale_rewards``).
        eps: added to the std (TRL uses 1e-4).
    Reference: arXiv:2402.03300 Sec. 4.1.2; TRL trl/trainer/grpo_trainer.py.
    """
    seq = group_normalised(inp.rewards, scale_rewards=scale_rewards, eps=eps)  # [B, G]
    return finish(per_token(seq, inp.mask), inp.mask)


@ADVANTAGES.register("dr_grpo", needs=(), optional=())
def dr_grpo(inp: AdvantageInput) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO: A_i = r_i - mean_g r (no std division). arXiv:2503.20783 Sec. 3.2."""
    seq = group_normalised(inp.rewards, scale_rewards="none")  # [B, G]
    return finish(per_token(seq, inp.mask), inp.mask)


@ADVANTAGES.register("rloo", needs=(), optional=())
def rloo(inp: AdvantageInput) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO: A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) (r_i - mean_g r).

    Reference: Ahmadian et al. 2024, arXiv:2402.14740 (the RLOO estimator of Kool et al. 2019);
    verl compute_rloo_outcome_advantage.
    Needs G >= 2.
    """
    r = inp.rewards  # [B, G]
    seq = r - leave_one_out_mean(r)  # [B, G]
    return finish(per_token(seq, inp.mask), inp.mask)


def discounted_returns(token_rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over valid tokens; the sum restarts at masked tokens
    (as verl compute_reinforce_plus_plus_outcome_advantage). [..., T] -> [..., T], 0 off mask."""
    m = mask.to(token_rewards.dtype)
    out = torch.zeros_like(token_rewards)  # [..., T]
    running = torch.zeros_like(token_rewards[..., 0])  # [...]
    for t in reversed(range(token_rewards.shape[-1])):
        running = (token_rewards[..., t] + gamma * running) * m[..., t]
        out[..., t] = running
    return out


@ADVANTAGES.register("reinforce_pp", needs=(), optional=("token_rewards",))
def reinforce_pp(inp: AdvantageInput, *, gamma: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE++: discounted token returns, whitened over the whole batch (no group baseline).

    r_t = outcome reward at the last token + token_rewards (e.g. a KL penalty); G_t as in
    ``discounted_returns``; A = (G - mean) / sqrt(var + 1e-8), mean and unbiased var over all
    valid tokens of the batch. Reference: arXiv:2501.03262 (REINFORCE++); verl
    compute_reinforce_plus_plus_outcome_advantage.
    """
    dense = outcome_token_rewards(inp.rewards, inp.mask, inp.token_rewards)  # [B, G, T]
    returns = discounted_returns(dense, inp.mask, gamma=gamma)  # [B, G, T]
    return finish(masked_whiten(returns, inp.mask), inp.mask)


@ADVANTAGES.register("reinforce_pp_baseline", needs=(), optional=("token_rewards",))
def reinforce_pp_baseline(inp: AdvantageInput) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE++-baseline: s_i = r_i + sum_t token_rewards_it; A_i = s_i - mean_g s (a single
    completion keeps mean 0), spread over tokens, then whitened over all valid batch tokens.

    Reference: arXiv:2501.03262; verl compute_reinforce_plus_plus_baseline_outcome_advantage.
    """
    dense = outcome_token_rewards(inp.rewards, inp.mask, inp.token_rewards)  # [B, G, T]
    score = dense.sum(dim=-1)  # [B, G]
    base = score.mean(dim=1, keepdim=True) if score.shape[1] > 1 else torch.zeros_like(score)
    tiled = per_token(score - base, inp.mask)  # [B, G, T]
    return finish(masked_whiten(tiled, inp.mask), inp.mask)
