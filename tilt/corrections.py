"""Training-inference correction (catalogue A8): reweight or drop tokens whose sampler probability
differs from the learner's.

When the tokens were sampled by another engine or precision (bf16 sampling, vLLM, asynchronous
rollouts), the sampler's log-probs mu(y_t) differ from the learner's own pi_old(y_t) for the same
weights. A policy loss that uses pi_old as its behaviour policy is then off by the ratio
rho_t = pi_old(y_t) / mu(y_t). Every correction here is a pure function

    fn(learner_logp [N, T], sampler_logp [N, T], mask [N, T], **hypers) -> (weight [N, T], metrics)

and the per-token policy loss is multiplied by ``weight`` (0 = token dropped) before the KL term is
added and the loss reduced, as TRL 1.16 does with its ``importance_sampling_ratio``
(grpo_trainer.py L2659-L2706, L3146-L3147). The weight is detached data.

    none          1 (the identity; also what every correction gives when sampler == learner)
    token_tis     min(rho_t, C) (and >= C_min)          truncated IS (TIS; TRL "token_truncate")
    sequence_tis  min(rho_seq, C), rho_seq = prod_t rho_t  (TRL "sequence_truncate")
    token_mis     rho_t if C_min <= rho_t <= C else 0    masked IS (TRL "token_mask")
    sequence_mis  rho_seq if C_min <= rho_seq <= C else 0 (TRL "sequence_mask", TRL's default)
    icepop        token_mis with IcePop's band [0.5, 5] (IcePop, Ring-1T arXiv:2510.18855)
    geo_rs        1 if lo <= exp(mean_t log rho_t) <= hi else 0: geometric-mean rejection of whole
                  sequences (verl ``rollout_rs="geometric"``), no reweighting

Truncated IS at C is biased by E_mu[(rho - C)^+ g] (Ionides 2008, "Truncated importance
sampling"), bounded by max|g| E_mu[(rho - C)^+]; untruncated sequence IS is unbiased; per-token
IS is unbiased only for one-token completions (it ignores the mismatch of the prefix
distribution). tests/test_corrections.py checks each on the exact harness.

Metrics (docs/metrics.md): ``mismatch/k3`` = masked mean of rho - 1 - log rho (an estimate of
KL(mu || pi_old) from tokens drawn from mu), ``mismatch/masked_frac`` = share of tokens with weight
0, ``mismatch/weight_mean``, ``mismatch/log_ratio_abs_max`` = max |log rho_t|.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from tilt.reduction import masked_mean
from tilt.registry import Registry

CORRECTIONS: Registry = Registry("correction")
Metrics = dict[str, Tensor]


def log_ratio(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log rho_t = log pi_old(y_t) - log mu(y_t), 0 on masked positions and where mu is NaN (unscored), [N, T]."""
    lr = torch.nan_to_num(learner_logp.detach() - sampler_logp.detach(), nan=0.0)
    return torch.where(mask > 0, lr, torch.zeros_like(lr))


def mismatch_metrics(log_rho: Tensor, weight: Tensor, mask: Tensor) -> Metrics:
    """k3 between sampler and learner, share of dropped tokens, mean weight, max |log rho| (module docstring)."""
    k3 = torch.exp(log_rho) - 1.0 - log_rho  # [N, T] >= 0, estimates KL(mu || pi_old) on y ~ mu
    m = mask.to(log_rho.dtype)
    return {
        "mismatch/k3": masked_mean(k3, m),
        "mismatch/masked_frac": masked_mean((weight == 0).to(log_rho.dtype), m),
        "mismatch/weight_mean": masked_mean(weight, m),
        "mismatch/log_ratio_abs_max": (log_rho.abs() * m).max() if m.numel() else torch.zeros(()),
    }


def _band(x: Tensor, low: Optional[float], high: Optional[float]) -> Tensor:
    """Bool [same shape]: low <= x <= high (a None bound is open)."""
    return (x >= (-math.inf if low is None else low)) & (x <= (math.inf if high is None else high))


def _finish(weight: Tensor, log_rho: Tensor, mask: Tensor) -> tuple[Tensor, Metrics]:
    weight = torch.where(mask > 0, weight, torch.zeros_like(weight))  # [N, T]
    return weight, mismatch_metrics(log_rho, weight, mask)


@CORRECTIONS.register("none")
def none(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> tuple[Tensor, Metrics]:
    """Weight 1 on every token: no correction (the mismatch metrics are still reported)."""
    log_rho = log_ratio(learner_logp, sampler_logp, mask)
    return _finish(torch.ones_like(log_rho), log_rho, mask)


@CORRECTIONS.register("token_tis", needs=("learner_logp",))
def token_tis(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, clip_max: float = 3.0,
              clip_min: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """Token-level truncated IS: clamp(rho_t, clip_min, clip_max) (TIS, Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; TRL ``token_truncate``; C = 3 is TRL's default)."""
    log_rho = log_ratio(learner_logp, sampler_logp, mask)
    return _finish(torch.exp(log_rho).clamp(min=clip_min, max=clip_max), log_rho, mask)


@CORRECTIONS.register("sequence_tis", needs=("learner_logp",))
def sequence_tis(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, clip_max: float = 3.0,
                 clip_min: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """Sequence-level truncated IS: clamp(prod_t rho_t, clip_min, clip_max) on every token (TRL ``sequence_truncate``)."""
    log_rho = log_ratio(learner_logp, sampler_logp, mask)
    seq = torch.exp(log_rho.sum(-1, keepdim=True)).clamp(min=clip_min, max=clip_max)  # [N, 1]
    return _finish(seq.expand_as(log_rho), log_rho, mask)


@CORRECTIONS.register("token_mis", needs=("learner_logp",))
def token_mis(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, clip_max: Optional[float] = 3.0,
              clip_min: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """Token-level masked IS: rho_t inside [clip_min, clip_max], 0 outside (TRL ``token_mask``)."""
    log_rho = log_ratio(learner_logp, sampler_logp, mask)
    rho = torch.exp(log_rho)  # [N, T]
    return _finish(torch.where(_band(rho, clip_min, clip_max), rho, torch.zeros_like(rho)), log_rho, mask)


@CORRECTIONS.register("sequence_mis", needs=("learner_logp",))
def sequence_mis(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, clip_max: Optional[float] = 3.0,
                 clip_min: Optional[float] = None) -> tuple[Tensor, Metrics]:
    """Sequence-level masked IS: rho_seq on every token if inside [clip_min, clip_max], else the sequence
    is dropped (TRL ``sequence_mask``, TRL's default mode)."""
    log_rho = log_ratio(learner_logp, sampler_logp, mask)
    seq = torch.exp(log_rho.sum(-1, keepdim=True))  # [N, 1]
    seq = torch.where(_band(seq, clip_min, clip_max), seq, torch.zeros_like(seq))
    return _finish(seq.expand_as(log_rho), log_rho, mask)


@CORRECTIONS.register("icepop", needs=("learner_logp",))
def icepop(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, low: float = 0.5,
           high: float = 5.0) -> tuple[Tensor, Metrics]:
    """IcePop: keep tokens with low <= rho_t <= high, weighted by rho_t; drop the rest (Ring-1T,
    arXiv:2510.18855, and the IcePop note ringtech.notion.site/icepop). Same function as token_mis;
    the band [0.5, 5] is our reading of the IcePop note (not confirmed against the report's text)."""
    return token_mis(learner_logp, sampler_logp, mask, clip_max=high, clip_min=low)


@CORRECTIONS.register("geo_rs", needs=("learner_logp",))
def geo_rs(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, low: float = 0.999,
           high: float = 1.001) -> tuple[Tensor, Metrics]:
    """Geometric-mean rejection: drop a sequence whose exp(mean_t log rho_t) leaves [low, high];
    weight 1 otherwise (verl ``rollout_rs="geometric"``). The default band (+-0.1%) is ours: set it
    from the ``mismatch/k3`` a run shows. Not a reweighting: it removes sequences (no bias when the
    sampler equals the learner; otherwise it keeps the sampler's distribution on what it keeps)."""
    log_rho = log_ratio(learner_logp, sampler_logp, mask)
    m = mask.to(log_rho.dtype)
    geo = torch.exp((log_rho * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))  # [N, 1]
    keep = _band(geo, low, high).to(log_rho.dtype).expand_as(log_rho)  # [N, T]
    return _finish(keep, log_rho, mask)
