"""Run any registered loss to convergence on EXACT expected losses, and closed-form targets.

``solve`` is the fixed-point check of METHODS.md: each step the sampling policy pi_old is the
current policy (detached), the loss's expectation over every completion is computed exactly
(tilt.exact.enumeration), and Adam (float64, cosine-decayed lr) takes a step on the table.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from tilt.exact.enumeration import Advantage, exact_expectation, resolve_loss, sequence_probs


@contextmanager
def single_thread() -> Iterator[None]:
    """Tables here are tiny: intra-op threads only add sync overhead (10-100x on a busy CPU).
    Scoped to the solver; the caller's thread count is restored on exit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def optimal_policy(problem, beta: float) -> Tensor:
    """pi* of max E[r] - beta KL(pi || pi_ref) as a probs table [S, V] (bandit: [X, K])."""
    return problem.optimal_policy(beta)


def tilted_distribution(problem, beta: float) -> Tensor:
    """Sequence-level pi_ref(y|x) exp(r(x,y)/beta) / Z(x), [X, Y]."""
    ref_seq = sequence_probs(problem, torch.softmax(problem.ref_logits, -1))  # [X, Y]
    rewards = problem.enumerate().rewards.reshape(ref_seq.shape)  # [X, Y]
    return torch.softmax(torch.log(ref_seq) + rewards / beta, dim=-1)


def solve(
    loss: str | Callable,
    problem,
    *,
    beta: float,
    steps: int = 300,
    lr: float = 0.1,
    advantage: Advantage = "exact",
    kl: Optional[str | Callable] = None,
    init_logits: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None,
    mode: Optional[str] = None,
    **loss_kwargs,
) -> Tensor:
    """Minimise a loss on-policy with exact expectations; return the final probs table [S, V].

    Args:
        loss: a LOSSES name (its reduction meta is used) or a callable loss.
        problem: Bandit or TokenTree.
        beta: KL coefficient. It is used for ``kl`` (reward placement), for the A*-PO
            ``baseline_v`` field, and is passed to the loss as ``beta=`` when the loss takes a
            ``beta`` keyword and ``loss_kwargs`` does not already set it.
        steps, lr: Adam steps and peak learning rate (cosine decay to 0).
        advantage: "exact" (A = r - E_pi[r], the infinite-group baseline), "reward", or callable.
        kl: KL estimator name (or callable) placed in the reward (-beta * kl per token), or None.
        init_logits: starting table [S, V]; default the reference policy.
        teacher_logits: [S, V] teacher table for distillation losses.
        mode: reduction override.
    Returns:
        softmax of the final logits table, [S, V]. Compare sequence distributions with
        ``total_variation(sequence_probs(problem, p), tilted_distribution(problem, beta))``.
    """
    call, mode = resolve_loss(loss, mode)
    if "beta" in inspect.signature(call).parameters and "beta" not in loss_kwargs:
        loss_kwargs["beta"] = beta
    start = problem.ref_logits if init_logits is None else init_logits
    logits = start.detach().clone().requires_grad_(True)  # [S, V]
    baseline_v = problem.soft_value(beta) if beta > 0 else None  # [X], computed once
    opt = torch.optim.Adam([logits], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with single_thread():
        for _ in range(steps):
            opt.zero_grad()
            value = exact_expectation(call, logits, problem, mode=mode, advantage=advantage,
                                      kl_in_reward=kl, beta=beta, teacher_logits=teacher_logits,
                                      baseline_v=baseline_v, loss_kwargs=loss_kwargs)
            value.backward()
            opt.step()
            sched.step()
    return torch.softmax(logits.detach(), dim=-1)


def maximize_objective(objective: Callable[[Tensor], Tensor], problem, *, iters: int = 200) -> Tensor:
    """argmax over tabular policies of ``objective(probs [S, V]) -> scalar``, by L-BFGS.

    High-precision direct optimisation over the simplex (softmax parametrisation), used for
    fixed points with no closed form (e.g. Tsallis-regularised objectives).
    """
    logits = problem.ref_logits.detach().clone().requires_grad_(True)  # [S, V]
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=iters, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = -objective(torch.softmax(logits, -1))
        value.backward()
        return value

    with single_thread():
        opt.step(closure)
    return torch.softmax(logits.detach(), dim=-1)
