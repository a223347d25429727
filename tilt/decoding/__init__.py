"""Decoders: one registry (``DECODERS``) of next-token rules and sequence-level selectors.

A token-level entry is ``fn(logits [N, V], *, values=None, **kwargs) -> log-probs [N, V]`` of the
next-token distribution. Its meta declares what it needs:
    needs:   () or ("values",) — per-token values Q(s, a) from a value model (Q♯, CD, TQ*);
    values:  what a value model's success probability p becomes: "soft_q" beta log(1 - p + p e^(1/beta))
             (Q♯'s regularised Q*) or "expected_reward" p (CD's prefix scorer, TQ*'s E_{rho_BL}[r]);
             or "probe" (a Q-Probe w^T phi of a whole completion, E5, from `tilt train-probe`);
    kind:    "token" (applied at every step), "sequence": ``fn(scores [B, n], *, n, ..., generator)
             -> index [B]`` choosing among n pi_ref completions per prompt, scored by the value model,
             or "block": the same selector applied to K pi_ref blocks of block_len tokens at each
             step (E4 blockwise CD, tilt.decoding.blockwise);
    candidates: the kwarg holding the number of candidates of a "sequence"/"block" entry ("n" or "k");
             or "search": ``fn(values [m], *, logp [m], ...) -> f [m]`` scores partial solutions of a
             best-first search over LM-proposed steps (``tilt.decoding.step_search``);
Config: ``decode.name`` picks the entry, ``decode.kwargs`` are its keyword arguments.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tilt.decoding import rules
from tilt.decoding.blockwise import check_block_kwargs, select_block
from tilt.decoding.qprobe import probe_select
from tilt.registry import Registry

DECODERS: Registry = Registry("decoder")


def _register(name: str, fn, *, needs: tuple[str, ...] = (), kind: str = "token", values: str = "soft_q",
              candidates: str = "n", doc: str = "") -> None:
    DECODERS.register(name, needs=needs, kind=kind, values=values, candidates=candidates, doc=doc)(fn)


def sample(logits: Tensor, *, values: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """Today's behaviour: softmax(logits / temperature)."""
    return rules.sample_logp(logits, temperature=temperature)


def greedy(logits: Tensor, *, values: Optional[Tensor] = None) -> Tensor:
    return rules.greedy_logp(logits)


def top_k(logits: Tensor, *, values: Optional[Tensor] = None, k: int, temperature: float = 1.0) -> Tensor:
    return rules.top_k_logp(logits, k=k, temperature=temperature)


def top_p(logits: Tensor, *, values: Optional[Tensor] = None, p: float, temperature: float = 1.0) -> Tensor:
    return rules.top_p_logp(logits, p=p, temperature=temperature)


def min_p(logits: Tensor, *, values: Optional[Tensor] = None, p: float, temperature: float = 1.0) -> Tensor:
    return rules.min_p_logp(logits, p=p, temperature=temperature)


def bregman(logits: Tensor, *, values: Optional[Tensor] = None, alpha: float = 1.0, k: Optional[int] = None,
            lam: Optional[float] = None, max_k: int = 64, mode: str = "primal", temperature: float = 1.0) -> Tensor:
    return rules.bregman_logp(logits, alpha=alpha, k=k, lam=lam, max_k=max_k, mode=mode, temperature=temperature)


def exclude(logits: Tensor, *, values: Optional[Tensor] = None, banned: list[int]) -> Tensor:
    return rules.excluded_logp(logits, banned=banned)


def _need_values(name: str, values: Optional[Tensor]) -> Tensor:
    if values is None:
        raise ValueError(f"decoder {name!r} needs a value model (per-token Q values) and none was given; "
                         f"train one with `tilt train-value` and pass it with --value-model")
    return values


def qsharp(logits: Tensor, *, values: Optional[Tensor] = None, beta: float = 1.0,
           top_k: Optional[int] = None, rest: str = "drop") -> Tensor:
    """E2 Q♯: pi_ref exp(Q/beta) over pi_ref's top-k, Q = beta log E[exp(r/beta)] from a distributional model."""
    return rules.guided_logp(logits, values=_need_values("qsharp", values), beta=beta, top_k=top_k,
                             rest=rest)


def controlled(logits: Tensor, *, values: Optional[Tensor] = None, beta: float = 1.0,
               top_k: Optional[int] = None, rest: str = "drop") -> Tensor:
    """E4 controlled decoding, token-level: pi_ref exp(V(s·a)/beta) with V a prefix scorer."""
    return rules.guided_logp(logits, values=_need_values("controlled", values), beta=beta, top_k=top_k,
                             rest=rest)


def transfer_q(logits: Tensor, *, values: Optional[Tensor] = None, beta: float = 1.0,
               top_k: Optional[int] = None, rest: str = "drop") -> Tensor:
    """E3 Transfer Q*: pi_ref exp(Q/beta), Q estimated by roll-outs of a baseline aligned model."""
    return rules.guided_logp(logits, values=_need_values("transfer_q", values), beta=beta, top_k=top_k,
                             rest=rest)


def best_of_n(scores: Tensor, *, n: int = 4, generator=None) -> Tensor:
    """E1 best-of-n: index of the highest-scoring of n candidates per row. scores [B, n] -> [B]."""
    return scores.argmax(-1)


def resample(scores: Tensor, *, n: int = 4, beta: float = 1.0, generator=None) -> Tensor:
    """E5 Q-Probe-style resampling: candidate drawn ∝ exp(score / beta). scores [B, n] -> [B]."""
    rules._check_beta(beta)
    return torch.multinomial(torch.softmax(scores / beta, -1), 1, generator=generator).squeeze(-1)


def controlled_block(scores: Tensor, *, k: int = 4, block_len: int = 4, beta: Optional[float] = None,
                     generator=None) -> Tensor:
    """E4 blockwise CD (arXiv:2310.17022): keep one of k pi_ref blocks by the prefix score V(s·block):
    argmax (beta None, the paper's rule) or drawn ∝ exp(V / beta). scores [B, k] -> [B]."""
    check_block_kwargs(k, block_len)
    return select_block(scores, beta=beta, generator=generator)


def qprobe(scores: Tensor, *, k: int = 4, beta: float = 1.0, generator=None) -> Tensor:
    """E5 Q-Probe (arXiv:2402.14688): one of k pi_ref completions drawn ∝ exp(w^T phi / beta). [B, k] -> [B]."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"qprobe needs k >= 1 candidate completions (an integer), got k={k!r}")
    return probe_select(scores, beta=beta, generator=generator)
def q_search(values: Tensor, *, logp: Tensor, k: int = 4, max_expansions: int = 32, alpha: float = 0.0,
             lam: float = 1.0, delimiters: str = ",>") -> Tensor:
    """E6 Q* step search: f = g + lam·h of partial solutions [m] (Q*, arXiv:2406.14283 §4.2), g = alpha·log
    pi_ref(path so far), h = the step Q of the last step; k steps proposed per expansion, at most
    ``max_expansions`` expansions, a step ends at a token containing a ``delimiters`` character or at EOS."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"q_search needs k >= 1 proposed steps per expansion, got k={k!r}")
    if not isinstance(max_expansions, int) or max_expansions < 1:
        raise ValueError(f"q_search needs max_expansions >= 1, got {max_expansions!r}")
    if not isinstance(delimiters, str) or not delimiters:
        raise ValueError(f"q_search needs delimiters: a non-empty string of step-ending characters, got {delimiters!r}")
    return alpha * logp + lam * values


_register("sample", sample, doc="softmax(logits / temperature): today's sampling")
_register("greedy", greedy, doc="argmax")
_register("top_k", top_k, doc="k most likely tokens, renormalised")
_register("top_p", top_p, doc="nucleus: smallest set with mass >= p")
_register("min_p", min_p, doc="tokens with prob >= p * max prob")
_register("bregman", bregman,
          doc="E7 alpha-Bregman top-k, mode primal|dual (fixed k, or adaptive k via lam by binary search)")
_register("exclude", exclude, doc="E7 (G)I-DLE-style exclusion of banned tokens (KL projection)")
_register("qsharp", qsharp, needs=("values",), doc="E2 Q♯ value guidance")
_register("controlled", controlled, needs=("values",), values="expected_reward",
          doc="E4 controlled decoding (token-level)")
_register("transfer_q", transfer_q, needs=("values",), values="expected_reward", doc="E3 Transfer Q* guidance")
_register("best_of_n", best_of_n, needs=("values",), kind="sequence",
          doc="E1 best-of-n of pi_ref samples, scored by the value model at the last token")
_register("resample", resample, needs=("values",), kind="sequence",
          doc="E5 resample one of n pi_ref samples ∝ exp(Q / beta) (Q-Probe's sampler)")
_register("controlled_block", controlled_block, needs=("values",), kind="block", values="expected_reward",
          candidates="k", doc="E4 blockwise controlled decoding: best (or ∝ exp(V/beta)) of k pi_ref blocks")
_register("qprobe", qprobe, needs=("values",), kind="sequence", values="probe", candidates="k",
          doc="E5 Q-Probe: one of k pi_ref completions ∝ exp(w^T phi / beta), probe from `tilt train-probe`")

_register("q_search", q_search, needs=("values",), kind="search", values="expected_reward",
          doc="E6 Q* best-first search over LM-proposed steps, h = a step-level Q head (`tilt train-value --steps`)")

__all__ = ["DECODERS", "rules"]
