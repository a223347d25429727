"""PURE: min-form credit assignment for process rewards (catalogue C4), arXiv:2504.15275.

Sum-form credit gives step s the value sum_{k >= s} gamma^(k-s) r_k, which a policy inflates by
adding high-reward steps. PURE's min-form value is the worst future step:

    V_s = min_{k >= s} r_k                                        ("min": the exact min form)

The authors realise it by transforming the process rewards and then summing as usual (README
of github.com/CJReinforce/PURE: sum_t softmax(-PR_t/T) PR_t approximates min_t PR_t as T -> 0):

    r*_s = softmax(-r / T)_s * r_s,    G_s = sum_{k >= s} r*_k     ("softmin": the default)

so G_0 = sum_s softmax(-r/T)_s r_s -> min_s r_s as T -> 0, and steps after the worst one
receive (almost) no credit. PURE uses an RLOO baseline; here

    A_t = G_{s(t)} - mean_{j != i} G^{(j)}_0  +  c (r_i - mean_{j != i} r_j)

for token t of completion i in step s(t); c = ``outcome_coef`` mixes in the verifiable outcome
reward (PURE-PRM+VR; c = 0 is PURE-PRM). Tokens after the last step get no process credit.
Step s covers the tokens (step_ends[s-1], step_ends[s]]; step 0 starts at token 0; the valid
step ends (finite reward, end >= 0) must be non-decreasing. The default T = 0.1 is ours.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import finish, leave_one_out_mean
from tilt.batch import AdvantageInput

FORMS = ("softmin", "min")


def valid_steps(step_rewards: Tensor, step_ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compact the valid steps (finite reward and end >= 0) to the front, keeping their order.

    Returns (rewards [B, G, S] with +inf padding, ends [B, G, S] with -1 padding, valid bool)."""
    valid = torch.isfinite(step_rewards) & (step_ends >= 0)  # [B, G, S]
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices  # valid first
    valid = valid.gather(-1, order)
    inf = torch.full_like(step_rewards, float("inf"))
    r = torch.where(valid, step_rewards.gather(-1, order), inf)
    ends = torch.where(valid, step_ends.gather(-1, order), torch.full_like(step_ends, -1))
    return r, ends, valid


def min_form_values(step_rewards: Tensor, valid: Tensor) -> Tensor:
    """V_s = min_{k >= s, valid} r_k, [..., S]; 0 on invalid steps. (PURE's min-form value.)"""
    r = torch.where(valid, step_rewards, torch.full_like(step_rewards, float("inf")))
    v = torch.flip(torch.cummin(torch.flip(r, [-1]), dim=-1).values, [-1])  # [..., S]
    return torch.where(valid, v, torch.zeros_like(v))


def softmin_returns(step_rewards: Tensor, valid: Tensor, *, temperature: float) -> Tensor:
    """G_s = sum_{k >= s} softmax(-r/T)_k r_k over the valid steps, [..., S]; 0 on invalid."""
    neg_inf = torch.full_like(step_rewards, -float("inf"))
    logits = torch.where(valid, -step_rewards / temperature, neg_inf)
    any_valid = valid.any(dim=-1, keepdim=True)
    w = torch.softmax(torch.where(any_valid, logits, torch.zeros_like(logits)), dim=-1)  # [..., S]
    r_star = torch.where(valid, w * step_rewards, torch.zeros_like(w))  # [..., S]
    g = torch.flip(torch.cumsum(torch.flip(r_star, [-1]), dim=-1), [-1])  # [..., S]
    return torch.where(valid, g, torch.zeros_like(g))


def token_step_index(ends: Tensor, valid: Tensor, T: int) -> Tensor:
    """Index of the step containing each token, [B, G, T]; -1 after the last step's end."""
    pos = torch.arange(T, device=ends.device)  # [T]
    before = valid.unsqueeze(-2) & (ends.unsqueeze(-2) < pos[:, None])  # [B, G, T, S]
    idx = before.sum(dim=-1)  # [B, G, T] number of valid steps closed before token t
    n = valid.sum(dim=-1, keepdim=True)  # [B, G, 1]
    return torch.where(idx < n, idx, torch.full_like(idx, -1))


@ADVANTAGES.register("pure", needs=("step_rewards",), optional=())
def pure(inp: AdvantageInput, *, form: str = "softmin", temperature: float = 0.1,
         outcome_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """PURE per-token advantages from process rewards (see module docstring).

    Args:
        form: "softmin" (the paper's transform, default) or "min" (exact min-form value).
        temperature: T of the softmin transform.
        outcome_coef: weight c of the RLOO outcome advantage added to every valid token.
    Needs G >= 2 (leave-one-out baseline).
    """
    if inp.step_rewards is None or inp.step_ends is None:
        raise ValueError("pure needs AdvantageInput.step_rewards and step_ends")
    if form not in FORMS:
        raise ValueError(f"unknown pure form {form!r}; valid: {', '.join(FORMS)}")
    r_steps, ends, valid = valid_steps(inp.step_rewards.to(inp.rewards.dtype), inp.step_ends)
    if form == "min":
        g = min_form_values(r_steps, valid)  # [B, G, S]
    else:
        g = softmin_returns(r_steps, valid, temperature=temperature)  # [B, G, S]
    traj = g[..., 0]  # [B, G] value of the whole completion (0 if it has no steps)
    step = token_step_index(ends, valid, inp.mask.shape[-1])  # [B, G, T]
    g_tok = g.gather(-1, step.clamp(min=0)) * (step >= 0).to(g.dtype)  # [B, G, T]
    adv = (g_tok - leave_one_out_mean(traj).unsqueeze(-1)) * (step >= 0).to(g.dtype)  # [B, G, T]
    adv = adv + outcome_coef * (inp.rewards - leave_one_out_mean(inp.rewards)).unsqueeze(-1)
    return finish(adv, inp.mask, {"pure/value_mean": traj.mean()})
