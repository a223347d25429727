"""KL and entropy regularisers beyond the RPG grid (catalogue A3-A7).

A3 Tsallis KL policy loss (arXiv:2301.11476)          -> "tsallis_pg"
A4 AKL, adaptive forward/reverse KL distillation (arXiv:2404.02657)   -> "akl_distill"
A5 AER, adaptive entropy regularisation (arXiv:2510.10959)  -> "aer" + controller functions
A6 Lp-Reg, KL toward a min-p filtered proxy (arXiv:2510.03222)  -> "lp_reg"
A7 critical-token KL (arXiv:2502.06533) is the KL estimator "critical" in tilt.kl.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput
from tilt.kl import KL_ESTIMATORS, q_log
from tilt.losses import LOSSES
from tilt.losses.rpg import log_ratios, to_tokens
from tilt.reduction import masked_mean
from tilt.state import Component


# ------------------------------------------------------------------ A3 Tsallis KL
@LOSSES.register("tsallis_pg", reduction="seq-mean-token-sum", needs=("ref_logp",))
def tsallis_pg(inp: PolicyLossInput, *, beta: float = 1e-3, q: float = 2.0, level: str = "token"
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """-w A + beta w (-ln_q(pi_ref/pi)): policy gradient for E[A] - beta D_q(pi || pi_ref).

    E_old[w (-ln_q(pi_ref/pi))] = sum pi (-ln_q(pi_ref/pi)) = D_q (Tsallis KL as defined in
    arXiv:2301.11476), so the expected gradient is exactly that of the objective (importance-weighted as in
    the RPG rkl surrogate). q = 1 is rpg_rkl. Fixed point: tilt.exact.tsallis_tilt (sparse for
    q > 1). ``level`` as in tilt.losses.rpg. Returns per-token loss [N, T], metrics.
    """
    r = log_ratios(inp, level)
    w = torch.exp(r.log_w)
    f = w * -q_log(-r.log_u, q)  # [N, T] or [N, 1]
    loss = -w * r.adv + beta * f
    return to_tokens(loss, inp, level), {"kl/tsallis": masked_mean(f.detach(), r.mask)}


# ------------------------------------------------------------------ A4 AKL
def akl_weights(student_logits: Tensor, teacher_logits: Tensor, *, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """Head/tail weights of AKL (arXiv:2404.02657, as its code), [N, T, V] -> ([N, T], [N, T]).

    Sort the teacher's probabilities p descending; the head is the shortest prefix whose mass
    reaches mu (the top token is always in it), the tail the rest. With the student's q
    (detached), g_head = sum_head |p - q|, g_tail = sum_tail |p - q|, and the weights are
    g_head / (g_head + g_tail) for FKL and g_tail / (g_head + g_tail) for RKL.
    """
    p = torch.softmax(teacher_logits.detach(), dim=-1)  # [N, T, V]
    qs = torch.softmax(student_logits.detach(), dim=-1)  # [N, T, V]
    p_sorted, order = p.sort(dim=-1, descending=True)
    gap = (p_sorted - qs.gather(-1, order)).abs()  # [N, T, V]
    before = p_sorted.cumsum(-1) - p_sorted  # [N, T, V] mass strictly above each token
    head = before < mu  # [N, T, V]; the top token has before = 0 < mu
    g_head = (gap * head).sum(-1)  # [N, T]
    g_tail = (gap * ~head).sum(-1)  # [N, T]
    total = (g_head + g_tail).clamp(min=1e-12)
    return g_head / total, g_tail / total


def akl(student_logits: Tensor, teacher_logits: Tensor, *, mu: float = 0.5) -> Tensor:
    """AKL = w_head KL(p || q) + w_tail KL(q || p), p teacher, q student (arXiv:2404.02657), [N, T]."""
    w_head, w_tail = akl_weights(student_logits, teacher_logits, mu=mu)
    logq = torch.log_softmax(student_logits, dim=-1)  # [N, T, V]
    logp = torch.log_softmax(teacher_logits.detach(), dim=-1)  # [N, T, V]
    fkl = (logp.exp() * (logp - logq)).sum(-1)  # [N, T]
    rkl = (logq.exp() * (logq - logp)).sum(-1)  # [N, T]
    return w_head * fkl + w_tail * rkl


@LOSSES.register("akl_distill", reduction="token-mean", needs=("logits", "teacher_logits"))
def akl_distill(inp: PolicyLossInput, *, mu: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """Adaptive KL distillation toward ``teacher_logits`` on every completion token."""
    if inp.logits is None or inp.teacher_logits is None:
        raise ValueError("akl_distill needs logits and teacher_logits [N, T, V]")
    per_token = akl(inp.logits, inp.teacher_logits, mu=mu)  # [N, T]
    w_head, _ = akl_weights(inp.logits, inp.teacher_logits, mu=mu)
    return per_token, {"akl/head_weight": masked_mean(w_head, inp.mask)}


# ------------------------------------------------------------------ A5 AER
# Source: arXiv:2510.10959 (abstract and secondary summaries only; the paper body and code were
# not found). Confirmed there: three components -- difficulty-aware coefficients, a target
# entropy anchored to the initial entropy (H* = tau H_0, best tau ~ 0.4), a global coefficient
# adjusted during training -- and the hyper-parameters tau and rho. The exact per-prompt
# allocation and the controller's step rule below are our reading, not the paper's equations.
@dataclass(frozen=True)
class AERState:
    """Controller state of AER: the global coefficient and the anchor entropy H_0."""

    alpha: float
    initial_entropy: Optional[float] = None


def aer_update(state: AERState, entropy: float, *, tau: float = 0.4, lr: float = 1e-3,
               alpha_max: float = 1.0) -> AERState:
    """One step of the global coefficient controller (AER component iii, arXiv:2510.10959).

    The target entropy is anchored to the first measured entropy: H* = tau * H_0. The
    coefficient moves toward keeping H near H*: alpha <- clip(alpha + lr * (H* - H), 0, alpha_max).
    Returns the new state (the first call records H_0). Our reading of the paper's rule: a
    proportional controller; the exact step form is not confirmed against the paper.
    """
    h0 = entropy if state.initial_entropy is None else state.initial_entropy
    alpha = min(max(state.alpha + lr * (tau * h0 - entropy), 0.0), alpha_max)
    return AERState(alpha=alpha, initial_entropy=h0)


class AERController(Component):
    """AER's global coefficient controller (component iii, arXiv:2510.10959) around ``aer_update``:
    the loss's per-step ``alpha`` (starting at the loss's ``alpha``), updated after each RL step
    from the step's entropy; kept in the trainer state under "aer".

    Settings (in loss.kwargs): tau (target entropy H* = tau H_0), controller_lr (the controller's
    step), alpha_max (upper bound of alpha); alpha is shared with the loss.
    """

    state_key = "aer"

    def __init__(self, *, alpha: float = 1e-3, tau: float = 0.4, controller_lr: float = 1e-3,
                 alpha_max: float = 1.0):
        if tau <= 0 or controller_lr < 0 or alpha_max < 0:
            raise ValueError(f"aer needs tau > 0, controller_lr >= 0, alpha_max >= 0; got {tau}, "
                             f"{controller_lr}, {alpha_max}")
        self.state, self.tau, self.lr, self.alpha_max = AERState(alpha=alpha), tau, controller_lr, alpha_max

    def loss_kwargs(self) -> dict[str, Any]:
        return {"alpha": self.state.alpha}

    def after_update(self, metrics: dict[str, float]) -> dict[str, float]:
        self.state = aer_update(self.state, metrics["entropy"], tau=self.tau, lr=self.lr, alpha_max=self.alpha_max)
        return {"aer/alpha": self.state.alpha, "aer/target_entropy": self.tau * self.state.initial_entropy}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = AERState(**state)


def aer_prompt_coefficients(accuracy: Tensor, *, alpha: float, rho: float = 1.0) -> Tensor:
    """Difficulty-aware coefficients (AER component i): lambda_i = alpha (1 - acc_i) if acc_i < rho
    else 0, so harder prompts (lower group accuracy) explore more. [B] -> [B]. Our reading."""
    return alpha * (1.0 - accuracy) * (accuracy < rho).to(accuracy.dtype)


def group_accuracy(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Mean reward of each sequence's own group, [N] -> [N]."""
    n_groups = int(group_index.max()) + 1
    sums = torch.zeros(n_groups, dtype=rewards.dtype).index_add(0, group_index, rewards)
    counts = torch.zeros(n_groups, dtype=rewards.dtype).index_add(0, group_index, torch.ones_like(rewards))
    return (sums / counts)[group_index]


def _clipped_pg(inp: PolicyLossInput, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """PPO-clip per-token loss max(-r A, -clip(r) A) (Eq. 7, arXiv:1707.06347) and the ratio."""
    ratio = torch.exp(inp.logp - inp.old_logp.detach())  # [N, T]
    adv = inp.advantages.detach()
    loss = torch.maximum(-ratio * adv, -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    return loss, ratio


def aer_per_token(inp: PolicyLossInput, coef: Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2) -> Tensor:
    """PPO-clip minus coef_i H_it: the entropy-regularised surrogate with per-sequence coefficients
    ``coef`` [N] (AER, arXiv:2510.10959). Returns [N, T]."""
    if inp.entropy is None:
        raise ValueError("aer needs PolicyLossInput.entropy")
    pg, _ = _clipped_pg(inp, eps_low, eps_high)  # [N, T]
    return pg - coef[:, None] * inp.entropy  # [N, T]


@LOSSES.register("aer", reduction="token-mean", needs=("rewards", "group_index", "entropy"),
                 state=AERController)
def aer(inp: PolicyLossInput, *, alpha: float = 1e-3, rho: float = 1.0, eps_low: float = 0.2,
        eps_high: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip minus lambda_i H_it, lambda_i = aer_prompt_coefficients(acc_i) (arXiv:2510.10959).

    ``alpha`` is the controller's current global coefficient (aer_update, kept by the trainer).
    """
    if inp.entropy is None or inp.rewards is None or inp.group_index is None:
        raise ValueError("aer needs entropy, rewards and group_index")
    lam = aer_prompt_coefficients(group_accuracy(inp.rewards, inp.group_index), alpha=alpha, rho=rho)  # [N]
    loss = aer_per_token(inp, lam, eps_low=eps_low, eps_high=eps_high)  # [N, T]
    return loss, {"entropy": masked_mean(inp.entropy.detach(), inp.mask), "aer/coef_mean": lam.mean()}


# ------------------------------------------------------------------ A6 Lp-Reg
# Source: arXiv:2510.03222 and its reference code, CarlanLark/Lp-Reg-dev (the authors' development
# repo of github.com/CarlanLark/Lp-Reg): verl/workers/actor/dp_actor.py ``apply_min_p`` (proxy),
# verl/trainer/ppo/core_algos.py ``compute_policy_loss_lp_reg`` (selection and loss) and the
# recipes recipe/lp_reg/*_onpolicy_64gpu.sh (min-p kappa = 0.02, rho = 1% (0.5% at 32B),
# beta = 1, low_var_kl, token-mean). The objective, per token:
#     selected:  -r A + beta * k3(pi_theta -> pi_proxy)      (ratio r NOT clipped there)
#     otherwise: max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A)   (PPO-clip)
# selected = among negative- (positive-) advantage tokens, the lowest-probability rho fraction
# (int(rho * n) of n), kept only where pi_theta < pi_proxy (the token survived the min-p filter).
# Differences we keep on purpose (both documented in docs/methods.md):
#   * the reference ranks tokens inside each micro-batch by the current log-prob and skips the
#     rank when int(rho n) == 1; we rank once per batch by the sampling policy's log-prob
#     (``lp_select``, equal to the current one at the first optimizer step), so k accumulated
#     micro-batches equal one full batch; without ``lp_select`` we rank inside the given tensors;
#   * the proxy is built from the current policy's detached logits (the reference's
#     ``minp_old_log_prob=False`` path; its recipes build it from the sampling policy, the same
#     value at the first optimizer step) at the training temperature.
def minp_proxy_logp(logits: Tensor, logp: Tensor, *, min_p: float = 0.02, mode: str = "minp") -> Tensor:
    """log pi_proxy(y_t) of the sampled tokens, [N, T, V] + [N, T] -> [N, T] (arXiv:2510.03222).

    The proxy drops presumed-noise tokens and renormalises: "minp" drops v with
    pi(v) < min_p * max pi, "fixed" drops pi(v) < min_p. A dropped sampled token gets -inf.
    Built from detached logits (the reference code builds it in a no-grad pass).
    """
    logq = torch.log_softmax(logits.detach(), dim=-1)  # [N, T, V]
    if mode == "minp":
        cut = logq.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p, dtype=logq.dtype))
    elif mode == "fixed":
        cut = torch.log(torch.tensor(min_p, dtype=logq.dtype)).expand(logq.shape[:-1] + (1,))
    else:
        raise ValueError(f"unknown Lp-Reg proxy mode {mode!r}; valid: minp, fixed")
    kept = torch.where(logq >= cut, logq, torch.full_like(logq, -torch.inf))  # [N, T, V]
    kept_mass = torch.logsumexp(kept, -1)  # [N, T] log of the surviving mass
    lp = logp.detach()
    return torch.where(lp >= cut[..., 0], lp - kept_mass, torch.full_like(lp, -torch.inf))


def lowest_fraction(values: Tensor, eligible: Tensor, frac: float) -> Tensor:
    """Mask of the int(frac * n) smallest ``values`` among the ``eligible`` ones (n of them), as the
    reference's ``int(len(indices) * k_percent)``."""
    n = int(eligible.sum())
    k = min(n, int(frac * n))
    chosen = torch.zeros_like(eligible)
    if k == 0:
        return chosen
    masked = torch.where(eligible, values, torch.full_like(values, torch.inf))
    idx = masked.reshape(-1).topk(k, largest=False).indices
    return chosen.reshape(-1).index_fill(0, idx, True).reshape(eligible.shape)


def lp_reg_selection(logp: Tensor, advantages: Tensor, mask: Tensor, *, neg_frac: float = 0.01,
                     pos_frac: float = 0.0) -> Tensor:
    """Lp-Reg candidates [N, T] bool: the lowest-probability ``neg_frac`` of the negative-advantage
    tokens and ``pos_frac`` of the positive ones, ranked over ALL the tensors given.

    Call it once on the whole batch (the training loop does, with the sampling policy's
    log-probs) and pass the result as ``PolicyLossInput.lp_select``, so micro-batching cannot
    change which tokens are chosen. Args: logp, advantages, mask [N, T] (detached).
    """
    valid = mask > 0
    lp, adv = logp.detach(), advantages.detach()
    pick = lowest_fraction(lp, valid & (adv < 0), neg_frac)
    return pick | lowest_fraction(lp, valid & (adv > 0), pos_frac)


def lp_reg_penalty(logp: Tensor, proxy_logp: Tensor, candidates: Tensor, *, estimator: str = "low_var_kl"
                   ) -> tuple[Tensor, Tensor]:
    """Per-token KL toward the proxy on the candidates that survived the filter (arXiv:2510.03222).

    A candidate is regularised only where log pi < log pi_proxy (``-inf`` proxies, i.e. filtered
    tokens, never pass). Penalty = estimator(logp, proxy_logp), low_var_kl = k3 with
    rho = pi_proxy / pi as the reference's ``kl_penalty``. Returns (penalty [N, T] zero off the
    selection, selection [N, T] bool).
    """
    lp = logp.detach()
    pick = candidates.bool() & (lp < proxy_logp)
    safe_proxy = torch.where(pick, proxy_logp, lp)  # finite everywhere
    kl = KL_ESTIMATORS.get(estimator)(logp, safe_proxy)  # [N, T]
    return torch.where(pick, kl, torch.zeros_like(kl)), pick


@LOSSES.register("lp_reg", reduction="token-mean", needs=("logits", "lp_select"))
def lp_reg(inp: PolicyLossInput, *, coef: float = 1.0, min_p: float = 0.02, mode: str = "minp",
           neg_frac: float = 0.01, pos_frac: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2
           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Lp-Reg: PPO-clip, and on the selected low-probability tokens -r A + coef * KL toward the
    min-p proxy instead (``compute_policy_loss_lp_reg``, arXiv:2510.03222; see the block comment).

    Args:
        coef: beta of the KL term (reference ``ppo_kl_coef`` = 1). min_p, mode: proxy filter
            (recipes: "minp", kappa = 0.02). neg_frac, pos_frac: rho for negative / positive
            advantages (recipes 0.01 and 0). eps_low, eps_high: PPO clip range elsewhere.
    Uses ``inp.lp_select`` (batch-level candidates) when given, else ranks inside ``inp``.
    Returns (per-token loss [N, T], {"lp_reg/frac"}).
    """
    if inp.logits is None:
        raise ValueError("lp_reg needs logits [N, T, V]")
    clipped, ratio = _clipped_pg(inp, eps_low, eps_high)  # [N, T]
    proxy = minp_proxy_logp(inp.logits, inp.logp, min_p=min_p, mode=mode)  # [N, T]
    if inp.lp_select is None:
        candidates = lp_reg_selection(inp.logp, inp.advantages, inp.mask, neg_frac=neg_frac, pos_frac=pos_frac)
    else:
        candidates = inp.lp_select.bool() & (inp.mask > 0)  # [N, T]
    penalty, pick = lp_reg_penalty(inp.logp, proxy, candidates)  # [N, T]
    selected = -ratio * inp.advantages.detach() + coef * penalty  # [N, T]
    return torch.where(pick, selected, clipped), {"lp_reg/frac": masked_mean(pick.to(clipped.dtype), inp.mask)}
