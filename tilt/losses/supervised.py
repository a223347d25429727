"""Supervised-learning views of RL with verifiable rewards (catalogue B5, B6, B9).

    pacs   reward as a label, BCE on a policy-derived score, arXiv:2509.02522
    nft    negative-aware fine-tuning with an implicit negative policy, arXiv:2505.18116
    redi   reference-free loss on positive and negative teacher traces, arXiv:2505.24850

Each registered loss is a thin wrapper around pure functions that take the per-sample
statistics (baselines, correct rates) explicitly, so the exact harness can feed their
infinite-group values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.losses import LOSSES
from tilt.losses.policy import Metrics, group_mean, group_sum, masked, seq_sum, spread
from tilt.reduction import masked_mean


def _labels(inp: PolicyLossInput, threshold: float) -> Tensor:
    if inp.rewards is None:
        raise ValueError("this loss needs PolicyLossInput.rewards (binary correctness labels)")
    return (inp.rewards > threshold).to(inp.logp.dtype)  # [N]


# ---------------------------------------------------------------- PACS (B5)


def pacs_score(logp: Tensor, old_logp: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    """Policy-derived score r^ = beta * sum_t log pi(y_t)/pi_old(y_t). [N, T] -> [N].

    ``reward_method="1"`` of the reference code (ritzz-ai/PACS src/pacs/pacs_core_algos.py
    ``compute_reward``); the paper's r^(q, o) = beta log pi_theta / pi_old (Sec. 3, arXiv:2509.02522).
    """
    return beta * seq_sum(logp - old_logp, mask)


def rloo_baseline(values: Tensor, group_index: Tensor) -> Tensor:
    """Leave-one-out mean of the other members of each group, [N] -> [N] (0 for a singleton).

    Gradients flow through the other members' values, as in the reference code.
    """
    n = group_sum(torch.ones_like(values), group_index)  # [N]
    others = group_sum(values, group_index) - values  # [N]
    return torch.where(n > 1, others / (n - 1.0).clamp(min=1.0), torch.zeros_like(values))


def balanced_class_weights(labels: Tensor, group_index: Tensor) -> Tensor:
    """Per-group "balanced" class weights n_g / (2 * count_c); 1 in single-class groups. [N] -> [N].

    As sklearn ``compute_class_weight("balanced")`` per question in the reference code
    (``compute_weight(mode="question")``).
    """
    n = group_sum(torch.ones_like(labels), group_index)  # [N]
    n_pos = group_sum(labels, group_index)  # [N]
    count_own = torch.where(labels > 0, n_pos, n - n_pos)  # [N]
    mixed = (n_pos > 0) & (n_pos < n)  # [N]
    return torch.where(mixed, n / (2.0 * count_own.clamp(min=1.0)), torch.ones_like(labels))


def pacs_bce(psi: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Weighted BCE of sigmoid(psi) against the reward label, per sequence. [N] -> [N]."""
    return weights * F.binary_cross_entropy_with_logits(psi, labels, reduction="none")


@LOSSES.register("pacs", reduction="seq-mean-token-sum", needs=("rewards", "group_index"))
def pacs(inp: PolicyLossInput, *, beta: float = 1.0, class_balance: bool = True,
         threshold: float = 0.5) -> tuple[Tensor, Metrics]:
    """PACS: BCE(sigmoid(psi_i), r_i) with psi_i = r^_i - mean_{j != i in group} r^_j (arXiv:2509.02522).

    Defaults follow the released scripts (scripts/pacs/pacs_beta_1.0.sh: beta 1, RLOO,
    class-balanced weights per question). The reference averages the weighted BCE over
    sequences (``BCEWithLogitsLoss(weight)``); the per-sequence value is spread over its
    tokens, so ``seq-mean-token-sum`` gives that mean. On-policy the gradient is
    -beta E[(r - 1/2) grad log pi] up to the RLOO and class weights: a policy gradient.
    """
    if inp.group_index is None:
        raise ValueError("pacs needs PolicyLossInput.group_index")
    labels = _labels(inp, threshold)  # [N]
    score = pacs_score(inp.logp, inp.old_logp, inp.mask, beta=beta)  # [N]
    psi = score - rloo_baseline(score, inp.group_index)  # [N]
    weights = balanced_class_weights(labels, inp.group_index) if class_balance else torch.ones_like(labels)
    per_seq = pacs_bce(psi, labels, weights)  # [N]
    metrics = {"pacs/score_mean": score.mean().detach(),
               "pacs/accuracy": ((psi > 0).to(labels.dtype) == labels).to(labels.dtype).mean().detach()}
    return spread(per_seq, inp.mask), metrics


# ---------------------------------------------------------------- NFT (B6)


def clamp_keep_grad(x: Tensor, min_val: float) -> Tensor:
    """Value max(x, min_val), gradient of x (NVlabs/NFT dp_actor.py ``clamp_preserve_grad``)."""
    return x + (x.clamp(min=min_val) - x).detach()


def nft_per_token(logp: Tensor, old_logp: Tensor, mask: Tensor, correct: Tensor, correct_rate: Tensor, *,
                  neg_weight: float = 1.0, clamp_positive: float = 0.0, clamp_negative: float = 1.0,
                  normalize: bool = True) -> Tensor:
    """NFT per-token loss (Eq. 9 / Alg. 1, arXiv:2505.18116), token ratios R_t = pi/pi_old.

        correct:  -log R_t                                   (maximise the positive policy)
        wrong:    -neg_weight * log[(1 - r_q R_t) / (1 - r_q)] (implicit negative policy
                  pi^- = (pi_old - r_q pi^+) / (1 - r_q), Eq. 5 ibid.)
        both times (1 - r_q) when ``normalize`` (the released ``normalize=1``).

    Args:
        correct: [N] bool. correct_rate: [N] r_q of each sequence's prompt, in (0, 1).
        clamp_positive, clamp_negative: gradient-preserving floors on R and on the negative
            proxy before the log (released defaults 0.0 and 1.0, train_7B.sh).
    Returns:
        [N, T].
    """
    if clamp_negative <= 0:
        raise ValueError(f"clamp_negative must be > 0 (the negative proxy can be <= 0), got {clamp_negative}")
    log_ratio = masked(logp - old_logp, mask).clamp(max=10.0)  # [N, T]
    ratio = torch.exp(log_ratio)  # [N, T]
    rq = correct_rate[:, None].to(ratio.dtype)  # [N, 1]
    if clamp_positive > 0:
        pos = -torch.log(clamp_keep_grad(ratio, clamp_positive))  # [N, T]
    else:
        pos = -log_ratio  # [N, T], = -log R exactly
    proxy = (1.0 - rq * ratio) / (1.0 - rq)  # [N, T]
    neg = -neg_weight * torch.log(clamp_keep_grad(proxy, clamp_negative))  # [N, T]
    loss = torch.where(correct[:, None], pos, neg)  # [N, T]
    if normalize:
        loss = loss * (1.0 - rq)
    return masked(loss, mask)


@LOSSES.register("nft", reduction="seq-mean-token-sum-norm", needs=("rewards", "group_index"))
def nft(inp: PolicyLossInput, *, neg_weight: float = 1.0, clamp_positive: float = 0.0, clamp_negative: float = 1.0,
        normalize: bool = True, threshold: float = 0.5, rate_clip: float = 0.02) -> tuple[Tensor, Metrics]:
    """NFT with r_q = the group's share of correct samples, clipped to [rate_clip, 1 - rate_clip].

    The released code sums token losses and divides by a constant (1000); we use Dr. GRPO's
    ``seq-mean-token-sum-norm`` (sum / (N * L_max)), the same up to a constant factor.
    neg_weight = 0 is rejection-sampling fine-tuning (RFT) on the positives.
    """
    if inp.group_index is None:
        raise ValueError("nft needs PolicyLossInput.group_index")
    labels = _labels(inp, threshold)  # [N]
    rate = group_mean(labels, inp.group_index).clamp(rate_clip, 1.0 - rate_clip)  # [N]
    loss = nft_per_token(inp.logp, inp.old_logp, inp.mask, labels > 0, rate, neg_weight=neg_weight,
                         clamp_positive=clamp_positive, clamp_negative=clamp_negative, normalize=normalize)
    ratio = torch.exp(masked(inp.logp - inp.old_logp, inp.mask))  # [N, T]
    return loss, {"ratio/mean": masked_mean(ratio, inp.mask).detach(), "nft/correct_rate": rate.mean().detach()}


# ---------------------------------------------------------------- REDI (B9)


@LOSSES.register("redi", reduction="seq-mean-token-mean", needs=("rewards",))
def redi(inp: PolicyLossInput, *, alpha: float = 0.8, threshold: float = 0.5) -> tuple[Tensor, Metrics]:
    """REDI: -log pi(y+)/|y+| + alpha * log pi(y-)/|y-| (the REDI objective, arXiv:2505.24850), reference-free.

    Checked against the reference code (Tim-Siu/reinforcement-distillation,
    trl/trl/trainer/dpo2_trainer.py ``loss_type == "reinforce"``: -c+ logp(y+)/|y+| + c- logp(y-)/|y-|
    per (positive, negative) pair) and its recipe experiments_trl/recipes/redi/redi_1_08_1e-6/config.yaml
    (c+ = 1, c- = alpha = 0.8, no reference model). Length normalisation is the
    ``seq-mean-token-mean`` reduction; we average over sequences instead of over pairs, i.e.
    half the reference's pair loss on balanced pairs (a constant factor, absorbed by the learning
    rate), which also lets unpaired on-policy groups use it. alpha < 1 is the paper's asymmetric
    weighting: shared prefixes of y+ and y- get net weight (1 - alpha) toward y+, so the
    positive likelihood cannot be dragged down (tests/test_losses_supervised.py). The
    reference's optional ``use_neg_weighting`` is not implemented. Offline use: feed teacher
    traces as the batch (``old_logp`` is not read).
    """
    labels = _labels(inp, threshold)  # [N]
    logp = masked(inp.logp, inp.mask)  # [N, T]
    sign = torch.where(labels > 0, -torch.ones_like(labels), alpha * torch.ones_like(labels))  # [N]
    loss = sign[:, None] * logp  # [N, T]
    return masked(loss, inp.mask), {"redi/pos_frac": labels.mean().detach()}
