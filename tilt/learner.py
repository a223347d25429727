"""Learner: a batch of scored rollouts in, optimizer steps out.

``LearnerBatch`` is plain tensors, so a learner can run in another process than the rollout.
One call to ``Learner.update`` takes ``epochs x minibatches`` optimizer steps; each step
accumulates ``grad_accum`` micro-batches that all divide by the mini-batch's denominator, so
the accumulated gradient equals that of one full mini-batch (tests/test_learner.py).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.reduction import masked_mean, reduce_tokens, reduction_denominator
from tilt.rollout import _atleast32, completion_logits, completion_token_logprobs, model_device, token_chunks
from tilt.token_logprobs import token_logprobs
from tilt.value_head import value_loss


def bind_kwargs(fn: Callable, kwargs: dict[str, Any], what: str) -> Callable:
    """``partial(fn, **kwargs)`` after checking every key is a keyword parameter of ``fn``."""
    params = inspect.signature(fn).parameters
    allowed = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown keyword {bad[0]!r} (value {kwargs[bad[0]]!r}); "
                         f"allowed: {', '.join(allowed) or 'none'}")
    return partial(fn, **kwargs)


@dataclass
class LearnerBatch:
    """Scored rollouts ready for optimisation. N sequences, P prompt, T completion tokens."""

    prompt_ids: Tensor  # [N, P]
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T]
    completion_mask: Tensor  # [N, T]
    old_logp: Tensor  # [N, T] sampling-policy log-probs
    advantages: Tensor  # [N, T]
    rewards: Tensor  # [N]
    group_index: Tensor  # [N]
    ref_logp: Optional[Tensor] = None  # [N, T]
    ref_logits: Optional[Tensor] = None  # [N, T, V]
    teacher_logits: Optional[Tensor] = None  # [N, T, V]
    prev_logp: Optional[Tensor] = None  # [N, T]
    baseline_v: Optional[Tensor] = None  # [N]
    loss_mask: Optional[Tensor] = None  # [N, T] tokens the policy loss sees (selection); None = completion_mask
    returns: Optional[Tensor] = None  # [N, T] value-head targets (GAE returns)
    old_values: Optional[Tensor] = None  # [N, T] value-head predictions at rollout time
    lp_select: Optional[Tensor] = None  # [N, T] bool, Lp-Reg candidates chosen over the whole batch
    sampler_logp: Optional[Tensor] = None  # [N, T] the sampler's log-probs when old_logp is the learner's own
    extras: dict[str, Tensor] = field(default_factory=dict)  # other provider outputs: [N] or [N, T, ...]

    def to(self, device: torch.device) -> "LearnerBatch":
        """The batch with every tensor on ``device`` (the learner moves each micro-batch to the model)."""
        moved = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                 for f in fields(self) if f.name != "extras"}
        return LearnerBatch(**moved, extras={k: v.to(device) for k, v in self.extras.items()})

    def select(self, idx: Tensor) -> "LearnerBatch":
        """Rows ``idx``, with completion columns past the longest selected completion trimmed
        (extras: every tensor with a second dimension is taken as per-token)."""
        width = int(self.completion_mask[idx].sum(-1).max().clamp(min=1))
        out = {"extras": {k: x[idx][:, :width] if x.dim() > 1 else x[idx] for k, x in self.extras.items()}}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in out:
                continue
            if v is None:
                out[f.name] = None
                continue
            v = v[idx]
            if f.name not in ("prompt_ids", "prompt_mask", "rewards", "group_index", "baseline_v"):
                v = v[:, :width]
            out[f.name] = v
        return LearnerBatch(**out)


def completion_forward(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                       completion_mask: Tensor, *, temperature: float, hidden: bool = False
                       ) -> tuple[Tensor, Optional[Tensor]]:
    """Teacher-forced logits at the completion positions, [N, T, V] (float32, / temperature),
    and, if ``hidden``, the last layer's hidden states there, [N, T, H] (the state before token t).
    Shared prompts run once per distinct prompt (``tilt.rollout.completion_logits``)."""
    logits, states = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                       hidden=hidden)
    logits = _atleast32(logits)
    return (logits if temperature == 1.0 else logits / temperature), states  # [N, T, V]


def forward_logits(model, b: LearnerBatch, temperature: float) -> Tensor:
    """Teacher-forced logits for the completion positions: [N, T, V] (float32, / temperature)."""
    return completion_forward(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask,
                              temperature=temperature)[0]


class NonFiniteLoss(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class Learner:
    """Owns the policy's optimizer; turns LearnerBatches into optimizer steps."""

    def __init__(self, model, optimizer, scheduler, *, loss_fn: Callable, loss_needs: tuple[str, ...],
                 reduction: str, max_len: int, temperature: float, kl_fn: Optional[Callable],
                 kl_beta: float, kl_in_loss: bool, epochs: int, minibatches: int, grad_accum: int,
                 grad_clip: float, generator: torch.Generator, max_bad_steps: int = 3,
                 kl_needs_logits: bool = False, value_head: Optional[torch.nn.Module] = None,
                 value_coef: float = 0.5, value_clip: Optional[float] = None,
                 micro_batch_tokens: Optional[int] = None, minibatch_by: str = "row",
                 kl_inputs: tuple[str, ...] = (), correction_fn: Optional[Callable] = None,
                 old_logp_from_forward: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_fn, self.loss_needs, self.reduction = loss_fn, set(loss_needs), reduction
        self.max_len, self.temperature = max_len, temperature
        self.kl_fn, self.kl_beta, self.kl_in_loss = kl_fn, kl_beta, kl_in_loss
        self.kl_inputs = tuple(kl_inputs)  # PolicyLossInput fields the KL estimator reads (registry ``needs``)
        self.correction_fn = correction_fn  # tilt.corrections: weight of each token's policy loss
        # exactly on-policy updates: log pi_old is this forward's own log-prob, detached (providers.frozen.LearnerLogProbs)
        self.old_logp_from_forward = old_logp_from_forward
        if old_logp_from_forward and (epochs != 1 or minibatches != 1):
            raise ValueError("old_logp_from_forward needs one optimizer step per batch (epochs=1, minibatches=1)")
        self.epochs, self.minibatches, self.grad_accum = epochs, minibatches, grad_accum
        self.micro_batch_tokens = micro_batch_tokens
        if minibatch_by not in ("row", "group"):
            raise ValueError(f"minibatch_by must be 'row' or 'group', not {minibatch_by!r}")
        self.minibatch_by = minibatch_by
        self.grad_clip, self.generator = grad_clip, generator
        self.max_bad_steps = max_bad_steps
        self.bad_streak = 0  # consecutive skipped optimizer steps, across updates (checkpointed)
        self.need_logits = bool({"logits", "ref_logits", "teacher_logits"} & self.loss_needs) or kl_needs_logits or (
            kl_fn is not None and getattr(kl_fn, "needs_logits", False))
        self.value_head, self.value_coef, self.value_clip = value_head, value_coef, value_clip
        self.device = model_device(model)
        self.clip_params = list(model.parameters()) + (list(value_head.parameters()) if value_head else [])

    def micro_loss(self, b: LearnerBatch, denominator: float, *, value_denominator: float = 1.0,
                   loss_kwargs: Optional[dict[str, Any]] = None) -> tuple[Tensor, dict[str, float]]:
        """Reduced loss of one micro-batch (divided by the mini-batch ``denominator``).

        With a value head, adds value_coef * value_loss (token-mean over ``value_denominator``).
        ``loss_kwargs`` are per-update loss hyper-parameters (e.g. AER's controlled alpha).
        """
        b = b.to(self.device)
        if self.need_logits or self.value_head is not None:  # the loss, KL or value head reads logits / states
            logits, hidden = completion_forward(self.model, b.prompt_ids, b.prompt_mask, b.completion_ids,
                                                b.completion_mask, temperature=self.temperature,
                                                hidden=self.value_head is not None)  # [n, T, V], [n, T, H]
            logp, entropy = token_logprobs(logits, b.completion_ids, entropy=True)  # [n, T], [n, T]
        else:  # log-softmax at the sampled tokens only, LM head and / temperature inside
            logits, hidden = None, None
            logp, entropy = completion_token_logprobs(self.model, b.prompt_ids, b.prompt_mask, b.completion_ids,
                                                      b.completion_mask, temperature=self.temperature,
                                                      entropy=True)  # [n, T], [n, T]
        mask = (b.completion_mask if b.loss_mask is None else b.loss_mask).float()  # [n, T]
        if self.old_logp_from_forward:  # the weights that sampled this batch are the ones running now
            b = replace(b, old_logp=logp.detach() * b.completion_mask)
        inp = PolicyLossInput(
            logp=logp, old_logp=b.old_logp, advantages=b.advantages, mask=mask, ref_logp=b.ref_logp,
            rewards=b.rewards, group_index=b.group_index, entropy=entropy,
            logits=logits if self.need_logits else None, ref_logits=b.ref_logits,
            teacher_logits=b.teacher_logits, prev_logp=b.prev_logp, baseline_v=b.baseline_v,
            lp_select=b.lp_select, extras=b.extras)
        per_token, lm = self.loss_fn(inp, **(loss_kwargs or {}))  # [n, T]
        stats = {k: float(v) for k, v in lm.items()}
        if self.correction_fn is not None and b.sampler_logp is not None:
            weight, cm = self.correction_fn(b.old_logp, b.sampler_logp, mask)  # [n, T] detached
            per_token = per_token * weight
            stats.update({k: float(v) for k, v in cm.items()})
        if self.kl_fn is not None and b.ref_logp is not None:
            kl = self.kl_fn(logp, b.ref_logp, logits=logits if self.need_logits else None,
                            ref_logits=b.ref_logits, **{k: getattr(inp, k) for k in self.kl_inputs})  # [n, T]
            if self.kl_in_loss and self.kl_beta > 0:
                per_token = per_token + self.kl_beta * kl
            stats["kl/mean"] = float(masked_mean(kl.detach(), mask))
        stats["entropy"] = float(masked_mean(entropy.detach(), mask))
        loss = reduce_tokens(per_token, mask, mode=self.reduction, denominator=denominator)
        if self.value_head is not None:
            values = self.value_head(hidden.to(next(self.value_head.parameters()).dtype))  # [n, T]
            vloss, vstats = value_loss(values, b.returns, b.completion_mask, clip_range=self.value_clip,
                                       old_values=b.old_values, denominator=value_denominator)
            loss = loss + self.value_coef * vloss
            stats.update({k: float(v) for k, v in vstats.items()})
        return loss, stats

    def permutation(self, batch: LearnerBatch) -> Tensor:
        """Row order for splitting into mini-batches: rows shuffled, or (``minibatch_by="group"``)
        whole groups shuffled, so a mini-batch holds complete groups and its shared-prompt forward
        runs each prompt once (``tilt.rollout.completion_logits``)."""
        n = batch.completion_ids.shape[0]
        if self.minibatch_by == "row":
            return torch.randperm(n, generator=self.generator)
        groups = torch.unique(batch.group_index)  # sorted group ids
        order = groups[torch.randperm(len(groups), generator=self.generator)]
        rank = torch.empty_like(order)
        rank[torch.searchsorted(groups, order)] = torch.arange(len(order))  # group id -> its new place
        return torch.sort(rank[torch.searchsorted(groups, batch.group_index)] * n + torch.arange(n)).indices

    def micro_batches(self, batch: LearnerBatch, rows: Tensor) -> list[Tensor]:
        """The mini-batch ``rows`` split into micro-batches of at most ceil(rows / grad_accum) rows,
        fewer if a part's forward would run more than ``micro_batch_tokens`` positions (a prompt
        shared by a part's rows counts once, as the shared-prompt forward runs it once): this bounds
        activation memory without changing the update."""
        return token_chunks(batch.prompt_ids, batch.prompt_mask, batch.completion_ids.shape[1], self.micro_batch_tokens,
                            rows=rows, max_rows=math.ceil(len(rows) / self.grad_accum))

    def update(self, batch: LearnerBatch, loss_kwargs: Optional[dict[str, Any]] = None) -> dict[str, float]:
        """``epochs x minibatches`` optimizer steps on ``batch``. Returns averaged metrics.

        A step whose loss or gradient norm is not finite is skipped (no parameter change)
        and counted in ``train/skipped``. After ``max_bad_steps`` consecutive skipped steps
        (counted across calls) ``NonFiniteLoss`` is raised before anything else changes.
        """
        n = batch.completion_ids.shape[0]
        loss_mask = batch.completion_mask if batch.loss_mask is None else batch.loss_mask  # [N, T]
        mb_size = math.ceil(n / self.minibatches)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        skipped, steps = 0, 0
        timing = {"fwd_bwd": 0.0, "optimizer": 0.0}  # seconds, summed over this update's optimizer steps
        for _ in range(self.epochs):
            perm = self.permutation(batch) if self.minibatches > 1 else torch.arange(n)
            for start in range(0, n, mb_size):
                mb = perm[start:start + mb_size]
                denom = reduction_denominator(loss_mask[mb].float(), self.reduction, max_len=self.max_len)
                vdenom = reduction_denominator(batch.completion_mask[mb].float(), "token-mean")
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                t_fwd = time.perf_counter()
                for micro in self.micro_batches(batch, mb):
                    loss, stats = self.micro_loss(batch.select(micro), denom,
                                                  value_denominator=vdenom, loss_kwargs=loss_kwargs)
                    if torch.isfinite(loss):
                        loss.backward()
                    total += float(loss.detach())
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                t_opt = time.perf_counter()
                timing["fwd_bwd"] += t_opt - t_fwd
                gnorm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip)
                steps += 1
                if not (math.isfinite(total) and math.isfinite(float(gnorm))):
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.bad_streak += 1
                    if self.bad_streak >= self.max_bad_steps:
                        raise NonFiniteLoss(f"{self.bad_streak} consecutive optimizer steps had a non-finite "
                                            f"loss ({total}) or gradient norm ({float(gnorm)})")
                    continue
                self.bad_streak = 0
                self.optimizer.step()
                self.scheduler.step()
                timing["optimizer"] += time.perf_counter() - t_opt
                sums["loss"] = sums.get("loss", 0.0) + total
                counts["loss"] = counts.get("loss", 0) + 1
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gnorm)
                counts["grad_norm"] = counts.get("grad_norm", 0) + 1
        out = {k: sums[k] / counts[k] for k in sums}
        out.update({"train/skipped": float(skipped), "train/optimizer_steps": float(steps),
                    "train/bad_streak": float(self.bad_streak), "lr": float(self.scheduler.get_last_lr()[0]),
                    "time/fwd_bwd_s": timing["fwd_bwd"], "time/optimizer_s": timing["optimizer"]})
        return out
