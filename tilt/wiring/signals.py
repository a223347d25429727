"""Rollout-time inputs of methods beyond the default loop. No gradient flows through here.

Shapes: N = B*G rows (group-major), T completion tokens, V vocabulary, S steps/segments.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.advantages.common import last_token_index, outcome_token_rewards
from tilt.advantages.gae import gae_advantages_returns
from tilt.advantages.segment import cutpoints
from tilt.batch import RolloutBatch
from tilt.learner import completion_forward
from tilt.losses.trajectory import astar_v_star
from tilt.rollout import SamplingParams, continue_from, decode_completions, generate
from tilt.tasks import get_task
from tilt.wiring.sampling import Scored

RewardsFn = Callable[[list[str], list[str], dict[str, list[Any]]], Tensor]  # -> [n] rewards


@dataclass
class Probe:
    """The sampling policy at the sampled tokens, from one no-grad teacher-forced pass."""

    entropy: Optional[Tensor] = None  # [N, T] H(pi(.|s_t)) at the rollout temperature, 0 off the mask
    values: Optional[Tensor] = None  # [N, T] value-head V(s_t), 0 off the mask


@torch.no_grad()
def policy_probe(model, rb: RolloutBatch, *, temperature: float, value_head=None) -> Probe:
    """Entropy of the sampling policy and (with a head) V(s_t) on the policy's last hidden states."""
    model.eval()
    logits, hidden = completion_forward(model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids,
                                        rb.completion_mask, temperature=temperature,
                                        hidden=value_head is not None)  # [N, T, V], [N, T, H]
    model.train()
    m = rb.completion_mask.float()  # [N, T]
    logp = torch.log_softmax(logits, -1)  # [N, T, V]
    entropy = -(logp.exp() * logp).sum(-1) * m  # [N, T]
    values = None
    if value_head is not None:
        p = next(value_head.parameters())
        values = value_head(hidden.to(p.device, p.dtype)).float().to(m.device) * m  # [N, T]
    return Probe(entropy=entropy, values=values)


@torch.no_grad()
def frozen_logits(model, rb: RolloutBatch, *, temperature: float) -> Tensor:
    """Teacher-forced logits [N, T, V] of a frozen model (reference, teacher, pi_prev) / temperature."""
    return completion_forward(model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids, rb.completion_mask,
                              temperature=temperature)[0]


def token_logp(logits: Tensor, token_ids: Tensor, mask: Tensor) -> Tensor:
    """log softmax(logits)[y_t] at the sampled tokens, [N, T, V] -> [N, T], 0 off the mask."""
    return torch.log_softmax(logits, -1).gather(-1, token_ids[..., None]).squeeze(-1) * mask


def char_to_token(tokenizer, token_ids: list[int], eos_id: int) -> list[int]:
    """End (exclusive) character offset of each token in the decoded completion (EOS decodes to "")."""
    ends, total = [], 0
    for t in token_ids:
        total += 0 if t == eos_id else len(tokenizer.decode([t], skip_special_tokens=True))
        ends.append(total)
    return ends


def process_steps(policy, sc: Scored) -> dict[str, Tensor]:
    """PURE's inputs: per-step rewards [N, S] (NaN-padded) and the token closing each step [N, S] (-1-padded).

    A task with ``step_rewards`` / ``step_char_ends`` (tilt.tasks.addition_steps) gives one
    reward per step and the step's last character, mapped here to the token holding it. A row
    of any other task is one step: its outcome reward, closed at its last token.
    """
    rows: list[tuple[list[float], list[int]]] = []
    for i, text in enumerate(sc.texts):
        m = sc.rb.completion_mask[i].bool()
        ids = sc.rb.completion_ids[i][m].tolist()
        last = len(ids) - 1
        task, cols = get_task(sc.columns["task"][i]), sc.columns["columns"][i]
        if not hasattr(task, "step_rewards"):
            rows.append(([float(sc.rewards[i])], [last]))
            continue
        ends = char_to_token(policy.tokenizer, ids, policy.eos_id)
        tok = [next((k for k, e in enumerate(ends) if e > c), last) for c in task.step_char_ends(text, **cols)]
        rows.append(([float(x) for x in task.step_rewards(text, **cols)], tok))
    S = max(len(r) for r, _ in rows)
    step_rewards = torch.full((len(rows), S), float("nan"))  # [N, S]
    step_ends = torch.full((len(rows), S), -1, dtype=torch.long)  # [N, S]
    for i, (r, e) in enumerate(rows):
        step_rewards[i, :len(r)] = torch.tensor(r)
        step_ends[i, :len(e)] = torch.tensor(e, dtype=torch.long)
    return {"step_rewards": step_rewards, "step_ends": step_ends}


def _repeat_columns(columns: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
    return {k: [v[i] for i in rows] for k, v in columns.items()}


@torch.no_grad()
def spo_values(policy, sc: Scored, *, params: SamplingParams, k: int, threshold: float, max_segments: int,
               rewards_fn: RewardsFn, generator: torch.Generator) -> dict[str, Tensor]:
    """SPO-chain's inputs (arXiv:2505.23564): segment ends [N, S] and Monte-Carlo values [N, T].

    Segment ends come from ``cutpoints`` (tokens drawn with probability < ``threshold``). From
    every end e before a completion's last token, K continuations of prompt + y_{<=e} are drawn
    from the current policy, each within the remaining budget max_new_tokens - (e + 1); values[n, e]
    is their mean reward (V of the prefix). Other positions stay 0 (spo_chain reads only the ends).
    """
    rb = sc.rb
    _, ends = cutpoints(rb.logprobs, rb.completion_mask.float(), threshold=threshold,
                        max_segments=max_segments)  # [N, S]
    last = last_token_index(rb.completion_mask)  # [N]
    pairs = [(n, e) for n in range(ends.shape[0]) for e in ends[n].tolist() if 0 <= e < int(last[n])]
    N, T = rb.completion_mask.shape
    values = torch.zeros(N, T)  # [N, T]
    if not pairs:
        return {"step_ends": ends, "values": values}
    row = torch.tensor([n for n, _ in pairs]).repeat_interleave(k)  # [M]
    cut = torch.tensor([e for _, e in pairs]).repeat_interleave(k)  # [M]
    pos = torch.arange(T)
    prefix_mask = (pos[None, :] <= cut[:, None]).long()  # [M, T]
    prefix_ids = torch.where(prefix_mask.bool(), rb.completion_ids[row], torch.full_like(prefix_mask, policy.pad_id))
    budget = params.max_new_tokens - (cut + 1)  # [M] >= 1
    policy.model.eval()
    cont = continue_from(policy.model, rb.prompt_ids[row], rb.prompt_mask[row], prefix_ids, prefix_mask,
                         params=replace(params, max_new_tokens=int(budget.max())), eos_id=policy.eos_id,
                         pad_id=policy.pad_id, generator=generator)
    policy.model.train()
    within = torch.arange(cont.completion_mask.shape[1])[None, :] < budget[:, None]  # [M, Tc]
    full = RolloutBatch(cont.prompt_ids, cont.prompt_mask,
                        torch.cat([prefix_ids, cont.completion_ids], 1),
                        torch.cat([prefix_mask, cont.completion_mask * within], 1), torch.zeros(0))
    texts = decode_completions(policy.tokenizer, full, policy.eos_id)
    r = rewards_fn([sc.prompts[i] for i in row.tolist()], texts, _repeat_columns(sc.columns, row.tolist()))
    mean = r.view(len(pairs), k).mean(-1)  # [pairs]
    values[torch.tensor([n for n, _ in pairs]), torch.tensor([e for _, e in pairs])] = mean
    return {"step_ends": ends, "values": values}


@torch.no_grad()
def astar_baseline(ref_model, policy, sc: Scored, *, samples: int, beta: float, params: SamplingParams,
                   rewards_fn: RewardsFn, generator: torch.Generator) -> Tensor:
    """A*-PO stage 1 for this step's prompts (stage 1, Sec. 3, arXiv:2505.20686): M samples from
    pi_ref per prompt, V*(x) = beta log mean_j exp(r_j / beta) (``astar_v_star``), repeated over
    the prompt's G rows, [N]. Computed lazily per step: the same estimate as an upfront pass."""
    B, G = len(sc.items), sc.group_size
    first = torch.arange(B) * G  # one row per prompt
    row = first.repeat_interleave(samples)  # [B*M]
    out = generate(ref_model, sc.rb.prompt_ids[row], sc.rb.prompt_mask[row], params=params,
                   eos_id=policy.eos_id, pad_id=policy.pad_id, generator=generator)
    texts = decode_completions(policy.tokenizer, out, policy.eos_id)
    r = rewards_fn([sc.prompts[i] for i in row.tolist()], texts, _repeat_columns(sc.columns, row.tolist()))
    v = astar_v_star(r.view(B, samples).double(), beta=beta).float()  # [B]
    return v.repeat_interleave(G)  # [N]


def gae_returns(rewards: Tensor, values: Tensor, mask: Tensor, token_rewards: Optional[Tensor], *,
                gamma: float, lam: float) -> Tensor:
    """Value-head targets R_t = A_t + V(s_t) before whitening (Eq. 16, arXiv:1506.02438), [B, G, T];
    the same dense reward as the ``gae`` estimator (outcome at the last token + token_rewards)."""
    dense = outcome_token_rewards(rewards, mask, token_rewards)  # [B, G, T]
    return gae_advantages_returns(dense, values, mask, gamma=gamma, lam=lam)[1]
