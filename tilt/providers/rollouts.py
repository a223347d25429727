"""Inputs drawn by extra rollouts: SPO-chain's Monte-Carlo segment values (continuations of the
current policy), A*-PO's offline V* and InfAlign's reference rewards (samples of pi_ref). No gradient
flows through here.

Shapes: N = B*G rows (group-major), T completion tokens, S segments, M samples.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from tilt.advantages.common import last_token_index
from tilt.advantages.segment import cutpoints
from tilt.batch import RolloutBatch
from tilt.config import ConfigError
from tilt.losses.trajectory import astar_v_star
from tilt.providers import Provider, RewardsFn, Run, StepData, provides
from tilt.rollout import SamplingParams, continue_from, decode_completions, generate
from tilt.wiring.sampling import Scored

ASTAR_SEED_OFFSET = 7_919  # the offline V* sampler is seeded apart from the policy's sampler


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
def reference_rewards(ref_model, policy, sc: Scored, *, samples: int, params: SamplingParams,
                      rewards_fn: RewardsFn, generator: torch.Generator) -> Tensor:
    """M completions of pi_ref per prompt of the step, scored by the run's reward, [B, M]."""
    B, G = len(sc.items), sc.group_size
    first = torch.arange(B) * G  # one row per prompt
    row = first.repeat_interleave(samples)  # [B*M]
    out = generate(ref_model, sc.rb.prompt_ids[row], sc.rb.prompt_mask[row], params=params,
                   eos_id=policy.eos_id, pad_id=policy.pad_id, generator=generator)
    texts = decode_completions(policy.tokenizer, out, policy.eos_id)
    r = rewards_fn([sc.prompts[i] for i in row.tolist()], texts, _repeat_columns(sc.columns, row.tolist()))
    return r.view(B, samples)


def astar_baseline(ref_model, policy, sc: Scored, *, samples: int, beta: float, params: SamplingParams,
                   rewards_fn: RewardsFn, generator: torch.Generator) -> Tensor:
    """A*-PO stage 1 for this step's prompts (stage 1, Sec. 3, arXiv:2505.20686): M samples from
    pi_ref per prompt, V*(x) = beta log mean_j exp(r_j / beta) (``astar_v_star``), repeated over
    the prompt's G rows, [N]. Computed lazily per step: the same estimate as an upfront pass."""
    r = reference_rewards(ref_model, policy, sc, samples=samples, params=params, rewards_fn=rewards_fn,
                          generator=generator)  # [B, M]
    v = astar_v_star(r.double(), beta=beta).float()  # [B]
    return v.repeat_interleave(sc.group_size)  # [N]


@provides("mc_values")
class SegmentValues(Provider):
    """SPO-chain's inputs (arXiv:2505.23564): segment ends [N, S] (tokens drawn with probability <
    ``prob_threshold``), Monte-Carlo values V(prefix) [N, T] from ``continuations`` rollouts of the
    current policy at each end, and the sampling log-probs (``spo_values``).

    Settings: continuations (K); max_segments; prob_threshold (shared with the estimator).
    """

    def __init__(self, run: Run, names: frozenset[str], *, continuations: int = 4, max_segments: int = 4,
                 prob_threshold: float = 0.9):
        super().__init__(run, names)
        if continuations < 1 or max_segments < 1:
            raise ConfigError(f"continuations and max_segments must be >= 1, got {continuations}, {max_segments}")
        self.k, self.max_segments, self.threshold = continuations, max_segments, prob_threshold

    def advantage(self, data: StepData) -> dict[str, Tensor]:
        out = spo_values(self.run.policy, data.scored, params=self.run.params, k=self.k, threshold=self.threshold,
                         max_segments=self.max_segments, rewards_fn=self.run.rewards_fn,
                         generator=self.run.generator)
        return {**out, "logprobs": data.scored.rb.logprobs}


@provides("baseline_v")
class OptimalValue(Provider):
    """A*-PO stage 1 (Sec. 3, arXiv:2505.20686): V*(x) = v_star_beta log mean_j exp(r_j / v_star_beta)
    over ``v_star_samples`` completions of pi_ref per prompt, [N] (``astar_baseline``), drawn by a
    sampler seeded apart from the policy's.

    Settings: v_star_samples (M); v_star_beta (the paper's beta_1; None = the method's ``beta``, then
    the fixed point is exact).
    """

    requires = ("ref_model",)

    def __init__(self, run: Run, names: frozenset[str], *, v_star_samples: int = 8,
                 v_star_beta: Optional[float] = None, beta: float = 0.1):
        super().__init__(run, names)
        if v_star_samples < 1 or (v_star_beta is not None and v_star_beta <= 0):
            raise ConfigError(f"v_star_samples must be >= 1 and v_star_beta > 0, got {v_star_samples}, {v_star_beta}")
        self.samples, self.beta = v_star_samples, v_star_beta or beta

    def batch(self, data: StepData) -> dict[str, Tensor]:
        sc, seed = data.scored, self.run.cfg.seed
        gen = torch.Generator().manual_seed(ASTAR_SEED_OFFSET + 1_000_003 * seed + sc.items[0].seed)
        v = astar_baseline(self.run.ref_model, self.run.policy, sc, samples=self.samples, beta=self.beta,
                           params=self.run.params, rewards_fn=self.run.rewards_fn, generator=gen)
        return {"baseline_v": v}


REF_REWARDS_SEED_OFFSET = 15_485_863  # the reference sampler of ``ref_rewards`` is seeded apart too


@provides("ref_rewards")
class ReferenceRewards(Provider):
    """Rewards of ``ref_samples`` completions of pi_ref per prompt, scored by the run's reward (the
    reference set InfAlign calibrates against, arXiv:2412.19792 Sec. 4), repeated over the prompt's
    G rows, [N, M], drawn by a sampler seeded apart from the policy's (``reference_rewards``).

    Settings: ref_samples (M).
    """

    requires = ("ref_model",)

    def __init__(self, run: Run, names: frozenset[str], *, ref_samples: int = 8):
        super().__init__(run, names)
        if ref_samples < 1:
            raise ConfigError(f"ref_samples must be >= 1, got {ref_samples}")
        self.samples = ref_samples

    def advantage(self, data: StepData) -> dict[str, Tensor]:
        sc, seed = data.scored, self.run.cfg.seed
        gen = torch.Generator().manual_seed(REF_REWARDS_SEED_OFFSET + 1_000_003 * seed + sc.items[0].seed)
        r = reference_rewards(self.run.ref_model, self.run.policy, sc, samples=self.samples, params=self.run.params,
                              rewards_fn=self.run.rewards_fn, generator=gen)  # [B, M]
        return {"ref_rewards": r.repeat_interleave(sc.group_size, dim=0)}  # [N, M]
