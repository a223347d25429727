"""SPO-chain: segment-level Monte Carlo advantages (catalogue C6), arXiv:2505.23564.

Segment Policy Optimization cuts each completion into segments and scores a segment by how much
it moved the Monte Carlo value of the prefix:

    A_k = V(s_{end of segment k}) - V(s_{start of segment k})

* partition (cutpoint-based): tokens the sampling policy drew with probability below rho are
  cutpoints; segment boundaries sit after every n-th cutpoint, so each segment holds about the
  same number of low-probability decisions (``cutpoints``);
* V(s) is the mean outcome of extra rollouts continued from the prefix s (the learner draws
  them); V(prompt) is estimated by the group mean reward and V(full completion) = its reward;
* probability mask: within a segment only the cutpoint tokens (prob < rho) receive A_k, the
  high-probability tokens get 0.

Inputs: ``step_ends`` [B, G, S] carries the segment end tokens (-1 = none; an end past the
completion counts as its last token) and ``values`` [B, G, T] carries the Monte Carlo value of
the prefix ending at token t (read only at segment ends that are not the last token).
Reference: arXiv:2505.23564 (SPO-chain); github.com/AIFrameResearch/SPO. The cutpoint
threshold rho and the 'every n-th cutpoint' placement are our reading of the paper (its code
was not available to us); both are hyper-parameters here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.advantages import ADVANTAGES
from tilt.advantages.common import finish, last_token_index
from tilt.advantages.process import token_step_index
from tilt.batch import AdvantageInput


def cutpoints(logprobs: Tensor, mask: Tensor, *, threshold: float = 0.9, max_segments: int = 4
              ) -> tuple[Tensor, Tensor]:
    """Low-probability cutpoints and the segment partition they induce.

    Args:
        logprobs: [..., T] log-probabilities of the sampled tokens under the sampling policy.
        mask: [..., T] 1 on completion tokens.
        threshold: rho; token t is a cutpoint iff exp(logprobs_t) < rho.
        max_segments: at most this many segments per completion.
    Returns:
        (is_cut bool [..., T], segment_ends long [..., max_segments] sorted, -1 padded). With n
        cutpoints and per = max(1, ceil(n / max_segments)), a segment ends at the cutpoints of
        rank per, 2 per, ..., (max_segments - 1) per; the last segment ends at the last token.
    """
    valid = mask > 0
    is_cut = valid & (logprobs.exp() < threshold)  # [..., T]
    rank = is_cut.to(torch.long).cumsum(dim=-1)  # [..., T] 1-based rank at a cutpoint
    n = rank[..., -1:]  # [..., 1]
    per = torch.clamp(torch.ceil(n.to(torch.float64) / max_segments).to(torch.long), min=1)
    last = last_token_index(mask).unsqueeze(-1)  # [..., 1]
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(rank)  # [..., T]
    inner = is_cut & (rank % per == 0) & (rank <= (max_segments - 1) * per) & (pos != last)
    boundary = inner | ((pos == last) & (last >= 0))  # [..., T]
    big = mask.shape[-1] + 1
    keyed = torch.where(boundary, pos, torch.full_like(pos, big)).sort(dim=-1).values
    ends = keyed[..., :max_segments]
    if ends.shape[-1] < max_segments:  # T < max_segments
        pad = torch.full(ends.shape[:-1] + (max_segments - ends.shape[-1],), big, dtype=ends.dtype)
        ends = torch.cat([ends, pad.to(ends.device)], dim=-1)
    return is_cut, torch.where(ends == big, torch.full_like(ends, -1), ends)


@ADVANTAGES.register("spo_chain", needs=("mc_values",), optional=())
def spo_chain(inp: AdvantageInput, *, logprobs: Tensor | None = None, prob_threshold: float = 0.9
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """SPO-chain per-token advantages (see module docstring).

    Args:
        logprobs: [B, G, T] sampling log-probabilities; when given, the probability mask keeps
            the segment advantage only on tokens with exp(logprobs) < prob_threshold.
        prob_threshold: rho of the probability mask (the same rho as ``cutpoints``).
    """
    if inp.step_ends is None or inp.values is None:
        raise ValueError("spo_chain needs AdvantageInput.step_ends (segment ends) and values (MC)")
    r = inp.rewards  # [B, G]
    T = inp.mask.shape[-1]
    last = last_token_index(inp.mask).unsqueeze(-1)  # [B, G, 1]
    ends = torch.where(inp.step_ends >= 0, inp.step_ends, torch.full_like(inp.step_ends, T + 1))
    ends = ends.sort(dim=-1).values  # [B, G, S] valid ends first
    valid = (ends <= T - 1) & (last >= 0)  # [B, G, S]
    # an end past the completion is its last token
    ends = torch.where(valid, torch.minimum(ends, last), torch.full_like(ends, -1))
    v_end = inp.values.to(r.dtype).gather(-1, ends.clamp(min=0))  # [B, G, S]
    is_last = ends == last  # [B, G, S] the terminal state's value is the reward itself
    v_end = torch.where(is_last, r.unsqueeze(-1).expand_as(v_end), v_end)
    v0 = r.mean(dim=1, keepdim=True).unsqueeze(-1).expand(*r.shape, 1)  # [B, G, 1] V(prompt)
    v_start = torch.cat([v0, v_end[..., :-1]], dim=-1)  # [B, G, S]
    seg_adv = torch.where(valid, v_end - v_start, torch.zeros_like(v_end))  # [B, G, S]
    step = token_step_index(ends, valid, T)  # [B, G, T]
    adv = seg_adv.gather(-1, step.clamp(min=0)) * (step >= 0).to(r.dtype)  # [B, G, T]
    if logprobs is not None:
        adv = adv * (logprobs.exp() < prob_threshold).to(adv.dtype)
    metrics = {"spo/segments_mean": valid.to(r.dtype).sum(-1).mean()}
    return finish(adv, inp.mask, metrics)
