"""TEMPO / P2T: prefix-tree credit assignment (catalogue C5), arXiv:2509.18314.

Prefix-to-Tree (P2T): the G completions of a prompt form a prefix tree over their tokens. The
value of a prefix s is the mean normalised outcome of the completions passing through it,

    V(s) = mean_{j : s is a prefix of y_j} r~_j,      r~ = GRPO-normalised reward,

so V(prompt) = mean r~ and V(full completion i) = r~_i (or the mean over identical copies).
TEMPO adds to GRPO's outcome signal a temporal-difference term at the tokens where the tree
branches (Tree-Estimated Mean Prefix Value for Policy Optimization):

    A_{i,t} = r~_i + lambda * 1[branch(s_t), t >= 1] * (V(s_{t+1}) - V(s_t))

where s_t is the prefix of y_i before token t. At a non-branching node every completion through
s_t also goes through s_{t+1}, so the TD term is exactly 0 there and TEMPO reduces to GRPO.
The branching at the prompt itself (t = 0) is not given a TD term: V(s_1) - V(prompt) would
repeat the GRPO term r~_i whenever the first tokens all differ; hence TEMPO equals GRPO exactly
when no two completions share a prefix past the prompt. (The exact gating and lambda are our
reading of the abstract and public summaries; we could not read the paper's equations.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import finish, per_token
from tilt.advantages.outcome import group_normalised
from tilt.batch import AdvantageInput


def shared_prefix(token_ids: Tensor, mask: Tensor) -> Tensor:
    """share[b, i, j, t] = True iff completions i and j agree on their first t tokens (all valid
    in both), for t = 0..T (t = 0 is the prompt: always shared). -> bool [B, G, G, T+1]."""
    valid = mask > 0  # [B, G, T]
    same = token_ids.unsqueeze(2) == token_ids.unsqueeze(1)  # [B, G, G, T]
    same = same & valid.unsqueeze(2) & valid.unsqueeze(1)
    ones = same.new_ones(same.shape[:-1] + (1,))  # [B, G, G, 1]
    return torch.cat([ones, same], dim=-1).to(torch.int32).cumprod(dim=-1) > 0  # [B, G, G, T+1]


def prefix_values(share: Tensor, values: Tensor) -> Tensor:
    """V(prefix of length t of completion i) = mean_j share[i, j, t] v_j, [B, G, T+1]."""
    w = share.to(values.dtype)  # [B, G, G, T+1]
    num = (w * values[:, None, :, None]).sum(dim=2)  # [B, G, T+1]
    return num / w.sum(dim=2).clamp(min=1.0)


@ADVANTAGES.register("tempo", needs=("token_ids",), optional=())
def tempo(inp: AdvantageInput, *, td_coef: float = 1.0, scale_rewards: str = "group",
          eps: float = 1e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """TEMPO advantages (see module docstring).

    Args:
        td_coef: lambda, weight of the branch-gated TD term.
        scale_rewards, eps: GRPO normalisation of the outcome (see outcome.group_normalised).
    """
    if inp.token_ids is None:
        raise ValueError("tempo needs AdvantageInput.token_ids (completion tokens)")
    r_norm = group_normalised(inp.rewards, scale_rewards=scale_rewards, eps=eps)  # [B, G]
    share = shared_prefix(inp.token_ids, inp.mask)  # [B, G, G, T+1]
    v = prefix_values(share, r_norm)  # [B, G, T+1]
    td = v[..., 1:] - v[..., :-1]  # [B, G, T] V(s_{t+1}) - V(s_t)
    count = share.sum(dim=2)  # [B, G, T+1] completions through each prefix
    branch = count[..., 1:] < count[..., :-1]  # [B, G, T] someone leaves i's path at token t
    branch[..., 0] = False  # no TD term at the prompt (see module docstring)
    gate = branch.to(td.dtype) * inp.mask.to(td.dtype)  # [B, G, T]
    adv = per_token(r_norm, inp.mask) + td_coef * gate * td  # [B, G, T]
    m = inp.mask.to(td.dtype)
    branch_frac = gate.sum() / m.sum().clamp(min=1.0)
    return finish(adv, inp.mask, {"tempo/branch_frac": branch_frac})
