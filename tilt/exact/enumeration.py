"""Every completion of a small problem, enumerated, and exact expectations over them.

A problem (``Bandit`` or ``TokenTree``) is a table of states S x actions V plus a list of
all N completions. Completion i belongs to prompt ``group[i]`` (probability ``prompt_prob[i]``),
has T tokens, and at position t sits in state ``states[i, t]`` and emits ``tokens[i, t]``.
A tabular softmax policy is a logits table [S, V]; the SAME PolicyLossInput the trainer builds
is built here for every completion at once.

Convention for exact expectations: with w_i = p(x_i) * pi_old(y_i | x_i) (detached), the
expectation of a per-token loss l_it under the sampling policy is

    E[loss] = sum_i w_i * s_i,   s_i = sum_t l_it m_it / c_i,

where c_i = 1 for reduction "seq-mean-token-sum", c_i = T for "seq-mean-token-sum-norm"
(L_max = T here) and c_i = sum_t m_it for the mean modes. Every completion of a problem has
the same length T, so this is the infinite-batch limit of tilt.reduction.reduce_tokens in
every mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from tilt.batch import PolicyLossInput


@dataclass(frozen=True)
class Enumeration:
    """All completions of a problem, prompt-major (completions of prompt 0 first)."""

    states: Tensor  # [N, T] long, state index into the [S, V] policy table
    tokens: Tensor  # [N, T] long, action taken at each position
    group: Tensor  # [N] long, prompt index x_i
    prompt_prob: Tensor  # [N] p(x_i)
    rewards: Tensor  # [N] r(x_i, y_i)
    n_prompts: int


Advantage = Union[str, Callable[[Tensor, Tensor, Tensor], Tensor]]


def table_logp(logits: Tensor, enum: Enumeration) -> Tensor:
    """log pi(y_it | s_it) for every completion token. logits: [S, V] -> [N, T]."""
    logp_table = torch.log_softmax(logits, dim=-1)  # [S, V]
    return logp_table[enum.states, enum.tokens]  # [N, T]


def sequence_probs(problem, probs: Tensor) -> Tensor:
    """pi(y | x) for every completion, as [X, Y] (row x sums to 1), from a probs table [S, V]."""
    enum = problem.enumerate()
    seq = torch.exp(torch.log(probs)[enum.states, enum.tokens].sum(-1))  # [N]
    return seq.reshape(enum.n_prompts, -1)  # [X, Y]


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """max over rows of 0.5 * sum |p - q| over the last dim (rows = prompts or states)."""
    tv = 0.5 * (p - q).abs().sum(-1)  # [...]
    return tv.max()


def group_mean(values: Tensor, weights: Tensor, enum: Enumeration) -> Tensor:
    """E_{y ~ pi(.|x_i)}[values] for each completion's own prompt. values, weights: [N] -> [N].

    ``weights`` are w_i = p(x_i) pi(y_i|x_i); dividing by p(x_i) gives the conditional.
    """
    cond = weights / enum.prompt_prob  # [N] pi(y_i | x_i)
    per_prompt = torch.zeros(enum.n_prompts, dtype=values.dtype)
    per_prompt = per_prompt.index_add(0, enum.group, cond * values)  # [X]
    return per_prompt[enum.group]  # [N]


def _advantages(advantage: Advantage, returns: Tensor, weights: Tensor, enum: Enumeration) -> Tensor:
    """Per-token advantages [N, T] from per-token returns-to-go [N, T]."""
    if callable(advantage):
        return advantage(returns, weights, enum)
    if advantage == "exact":  # infinite-group baseline: A = G - E_pi[G_0 | x]
        return returns - group_mean(returns[:, 0], weights, enum)[:, None]
    if advantage == "reward":  # no baseline: A = G
        return returns
    raise ValueError(f"unknown exact advantage {advantage!r}; valid: 'exact', 'reward', or a callable")


def policy_input(
    problem,
    logits: Tensor,
    *,
    old_logits: Optional[Tensor] = None,
    advantage: Advantage = "exact",
    kl_in_reward: Optional[str | Callable] = None,
    beta: float = 0.0,
    teacher_logits: Optional[Tensor] = None,
    baseline_v: Optional[Tensor] = None,
) -> tuple[PolicyLossInput, Tensor]:
    """The PolicyLossInput of every completion, and the sampling weights w_i.

    Args:
        problem: a Bandit or TokenTree.
        logits: [S, V] current policy table (carries grad).
        old_logits: [S, V] sampling policy; default the detached current policy (on-policy).
        advantage: "exact" (A = G - E_pi_old[G | x], the infinite-group baseline), "reward"
            (A = G), or callable(returns [N, T], weights [N], enum) -> [N, T].
        kl_in_reward: a KL estimator name (or callable with its signature); if given, each
            token gets reward -beta * kl_t (evaluated at pi_old, detached) and G_it = r_i - beta * sum_{t' >= t} kl_it'.
        beta: KL coefficient for ``kl_in_reward``.
        teacher_logits: [S, V] optional teacher table (distillation losses).
        baseline_v: [X] value for the ``baseline_v`` field; default V*(x) = beta log
            E_ref exp(r/beta) when beta > 0 (A*-PO's stage-1 target, exact here).
    Returns:
        (inp, weights [N]) with w_i = p(x_i) * pi_old(y_i | x_i), detached.
    """
    enum = problem.enumerate()
    logp_table = torch.log_softmax(logits, dim=-1)  # [S, V]
    old_table = logp_table.detach() if old_logits is None else torch.log_softmax(old_logits.detach(), -1)
    ref_table = torch.log_softmax(problem.ref_logits, dim=-1)  # [S, V]
    logp = logp_table[enum.states, enum.tokens]  # [N, T]
    old_logp = old_table[enum.states, enum.tokens]  # [N, T]
    ref_logp = ref_table[enum.states, enum.tokens]  # [N, T]
    weights = enum.prompt_prob * torch.exp(old_logp.sum(-1))  # [N]
    n, t = logp.shape
    returns = enum.rewards[:, None].expand(n, t).clone()  # [N, T]
    if kl_in_reward is not None:
        from tilt.kl import KL_ESTIMATORS

        estimator = kl_in_reward if callable(kl_in_reward) else KL_ESTIMATORS.get(kl_in_reward)
        kl_tok = estimator(
            old_logp, ref_logp, logits=old_table[enum.states], ref_logits=ref_table[enum.states]
        )  # [N, T]
        returns = returns - beta * kl_tok.flip(-1).cumsum(-1).flip(-1)  # [N, T] reward-to-go
    entropy_table = -(logp_table.exp() * logp_table).sum(-1)  # [S]
    if baseline_v is None and beta > 0:
        baseline_v = problem.soft_value(beta)  # [X]
    inp = PolicyLossInput(
        logp=logp,
        old_logp=old_logp,
        advantages=_advantages(advantage, returns, weights, enum).detach(),
        mask=torch.ones(n, t, dtype=logp.dtype),
        ref_logp=ref_logp,
        rewards=enum.rewards,
        group_index=enum.group,
        entropy=entropy_table[enum.states],  # [N, T]
        logits=logits[enum.states],  # [N, T, V]
        ref_logits=problem.ref_logits[enum.states],  # [N, T, V]
        teacher_logits=None if teacher_logits is None else teacher_logits[enum.states],
        prev_logp=old_logp,
        baseline_v=None if baseline_v is None else baseline_v[enum.group],  # [N]
    )
    return inp, weights


def expected_loss(per_token: Tensor, weights: Tensor, mask: Tensor, *, mode: str) -> Tensor:
    """sum_i w_i * s_i with s_i the per-sequence reduction of ``mode`` (module docstring)."""
    masked = per_token * mask  # [N, T]
    if mode == "seq-mean-token-sum":
        per_seq = masked.sum(-1)  # [N]
    elif mode == "seq-mean-token-sum-norm":
        per_seq = masked.sum(-1) / mask.shape[1]  # [N]
    elif mode in ("token-mean", "seq-mean-token-mean"):
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [N]
    else:
        raise ValueError(f"unknown reduction mode {mode!r}")
    return (weights * per_seq).sum()


def resolve_loss(fn, mode: Optional[str]) -> tuple[Callable, str]:
    """A loss given by registry name or callable -> (callable, reduction mode)."""
    if isinstance(fn, str):
        from tilt.losses import LOSSES

        entry = LOSSES.entry(fn)
        return entry.fn, mode or entry.meta.get("reduction", "seq-mean-token-sum")
    return fn, mode or "seq-mean-token-sum"


def exact_expectation(fn, logits: Tensor, problem, *, mode: Optional[str] = None, **input_kwargs) -> Tensor:
    """Exact E[loss] over all completions, differentiable w.r.t. ``logits`` [S, V].

    Args:
        fn: a LOSSES name (its ``reduction`` meta is used) or callable(inp, **kw) returning
            a per-token tensor [N, T] or (per_token, metrics).
        logits: [S, V] policy table.
        problem: a Bandit or TokenTree.
        mode: reduction override. ``input_kwargs`` go to ``policy_input`` (old_logits,
            advantage, kl_in_reward, beta, teacher_logits, baseline_v); keyword hypers of the loss go in
            ``loss_kwargs``.
    Returns:
        Scalar. Its gradient is the exact expected gradient of the surrogate, with the
        sampling weights w_i detached (REINFORCE-style estimators stay estimators).
    """
    loss_kwargs = input_kwargs.pop("loss_kwargs", {}) or {}
    call, mode = resolve_loss(fn, mode)
    inp, weights = policy_input(problem, logits, **input_kwargs)
    out = call(inp, **loss_kwargs)
    per_token = out[0] if isinstance(out, tuple) else out
    return expected_loss(per_token, weights, inp.mask, mode=mode)


def exact_gradient(fn, logits: Tensor, problem, **kwargs) -> Tensor:
    """d E[loss] / d logits, [S, V], by autograd through the exact weighted sum."""
    table = logits.detach().clone().requires_grad_(True)
    value = exact_expectation(fn, table, problem, **kwargs)
    (grad,) = torch.autograd.grad(value, table)
    return grad
