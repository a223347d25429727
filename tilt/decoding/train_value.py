"""`tilt train-value`: Q♯ (arXiv:2502.20548, Algorithm 1) for a causal LM with a QHead.

Each round: draw prompts; roll in with the current guided policy (round 1: pi_ref) to a uniform
switch step h of its completion; roll out with pi_ref from there (the roll-out's first token is
a_h); score the finished completion with the task verifier. The example (hidden state at s_h, a_h,
r) joins the aggregated dataset of all rounds, the head is refit on it by maximum likelihood
(binary cross-entropy of P(r = 1 | s_h, a_h)), and the next round rolls in with qsharp guidance.

Transfer Q* (arXiv:2405.20495): roll out with a baseline aligned model rho_BL instead (direct
transfer: the head learns E_rho_BL[r | s, a]); with ``indirect_beta`` the baseline was aligned to
another reward, and each roll-out tau after a_h is weighted by w = (pi_ref / rho_BL)(tau) e^{r / beta}
(rho_BL's implicit reward undone, the target's put in), so the weighted fit learns E_{pi*}[r | s, a].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tilt.decoding.lm import Decoding
from tilt.decoding.value_model import QHead
from tilt.rewards import verifier_reward
from tilt.rollout import (SamplingParams, completion_logits, continue_from, decode_completions, encode_prompts,
                          sequence_logprobs)


@dataclass
class ValueData:
    """Aggregated Q♯ data: hidden states at s_h [M, H], tokens a_h [M], rewards [M], and (indirect
    transfer) log importance weights [M] of the roll-outs (None: every example weighs the same)."""

    hidden: Tensor
    tokens: Tensor
    rewards: Tensor
    log_weights: Optional[Tensor] = None

    def extend(self, other: "ValueData") -> "ValueData":
        if (self.log_weights is None) != (other.log_weights is None):
            raise ValueError("cannot aggregate weighted (indirect transfer) and unweighted roll-out data")
        lw = None if self.log_weights is None else torch.cat([self.log_weights, other.log_weights])
        return ValueData(torch.cat([self.hidden, other.hidden]), torch.cat([self.tokens, other.tokens]),
                         torch.cat([self.rewards, other.rewards]), lw)


def indirect_log_weights(ref_model, rollout_model, out, rewards: Tensor, *, beta: float) -> Tensor:
    """Transfer Q*'s indirect weights (Sec. 3.2, arXiv:2405.20495), log w = r / beta + log pi_ref(tau) -
    log rho_BL(tau) over the roll-out's tokens after its first a_h (Q conditions on a_h), [N].
    ``out``: the roll-out batch (prompt = prompt + roll-in prefix; completion = a_h, tau), sampled at T = 1."""
    mask = out.completion_mask.clone()  # [N, T]
    mask[:, 0] = 0  # a_h is the action, not part of the continuation
    args = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    ref = sequence_logprobs(ref_model, *args, temperature=1.0)[0]  # [N, T]
    bl = sequence_logprobs(rollout_model, *args, temperature=1.0)[0]  # [N, T]
    return rewards / beta + ((ref - bl) * mask).sum(-1)


@torch.no_grad()
def collect(policy, items, decoding: Decoding, *, max_new_tokens: int, generator: torch.Generator,
            rollout_model=None, indirect_beta: Optional[float] = None, all_tokens: bool = False) -> ValueData:
    """One round of roll-in (``decoding``) / roll-out (pi_ref, or ``rollout_model``) data for ``items``.

    ``rollout_model`` (same tokenizer) rolls out instead of pi_ref: with a baseline aligned policy this
    estimates Transfer Q*'s Q(s, a) = E_{rho_BL}[r | s, a] (arXiv:2405.20495) on pi_ref's hidden states;
    with ``indirect_beta`` each example carries the indirect-transfer log weight (``indirect_log_weights``).
    ``all_tokens``: every roll-out token (a_h and each pi_ref token after it, up to EOS) is an example
    (s_t, a_t, r), since each is itself followed by a pi_ref continuation; a roll-out's L examples weigh
    1/L each (log weight -log L), so the fit is the mean over roll-outs of the per-roll-out mean BCE.
    This is the Q♯ reference code's default (use_all_ref_tokens=1 with per-sequence loss averaging).
    """
    if indirect_beta is not None and (rollout_model is None or not indirect_beta > 0):
        raise ValueError(f"indirect transfer needs a rollout model and beta > 0, got {indirect_beta!r}")
    if all_tokens and indirect_beta is not None:
        raise ValueError("all_tokens is not available with indirect transfer (each token would need the "
                         "importance weight of its own continuation); use one of the two")
    model, tok, eos, pad = policy.model, policy.tokenizer, policy.eos_id, policy.pad_id
    ids, mask = encode_prompts(tok, [it.prompt for it in items])
    rollin, _ = decoding.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad,
                                  generator=generator)
    lengths = rollin.completion_mask.sum(-1)  # [N] >= 1
    h = (torch.rand(len(items), generator=generator) * lengths).long()  # [N] uniform in [0, len)
    prefix_mask = (torch.arange(rollin.completion_ids.shape[1])[None] < h[:, None]).long()  # [N, T]
    out = continue_from(rollout_model or model, ids, mask, rollin.completion_ids, prefix_mask,
                        params=SamplingParams(max_new_tokens, 1.0), eos_id=eos, pad_id=pad, generator=generator)
    prefixes = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                for r, m in zip(rollin.completion_ids, prefix_mask)]
    texts = [(p + s) for p, s in zip(prefixes, decode_completions(tok, out, eos))]
    rewards = verifier_reward([it.prompt for it in items], texts, task=[it.task for it in items],
                              columns=[it.columns for it in items])
    r = torch.tensor(rewards, dtype=torch.float32).clamp(0, 1)  # [N]
    if all_tokens:
        keep = out.completion_mask.bool()  # [N, T] a_h, the roll-out tokens, EOS
        _, states = completion_logits(model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                      out.completion_mask, hidden=True)  # [N, T, H] state before each token
        lengths = keep.sum(-1)  # [N] >= 1
        return ValueData(states[keep].float(), out.completion_ids[keep], r.repeat_interleave(lengths),
                         (-lengths.float().log()).repeat_interleave(lengths))
    first = out.completion_ids[:, :1]  # [N, 1] a_h
    _, states = completion_logits(model, out.prompt_ids, out.prompt_mask, first, torch.ones_like(first), hidden=True)
    lw = None if indirect_beta is None else indirect_log_weights(model, rollout_model, out, r, beta=indirect_beta)
    return ValueData(states[:, 0].float(), first[:, 0], r, lw)


def _bce(head: QHead, data: ValueData, rows: Tensor) -> Tensor:
    """Mean BCE over ``rows``; with log weights, the self-normalised weighted mean sum_i w_i bce_i / sum_i w_i
    (its minimiser per (s, a) is sum w r / sum w, the reweighted expectation)."""
    logits = head(data.hidden[rows]).gather(-1, data.tokens[rows, None]).squeeze(-1)  # [m]
    if data.log_weights is None:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, data.rewards[rows])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.rewards[rows], reduction="none")  # [m]
    return (torch.softmax(data.log_weights[rows], 0) * bce).sum()


def fit_head(head: QHead, data: ValueData, *, epochs: int = 200, lr: float = 1e-2, weight_decay: float = 0.0,
             val_frac: float = 0.0, generator: torch.Generator | None = None) -> float:
    """Maximum likelihood of the Bernoulli reward of each (s_h, a_h); full-batch AdamW.

    ``val_frac`` > 0 holds out that fraction and keeps the parameters of the epoch with the lowest
    held-out BCE (early stopping). Returns the final training (or best held-out) loss.
    """
    m = len(data.rewards)
    order = torch.randperm(m, generator=generator)
    n_val = int(val_frac * m)
    val, train = order[:n_val], order[n_val:]
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state = float("inf"), None
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        loss = _bce(head, data, train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if n_val:
            with torch.no_grad():
                held = float(_bce(head, data, val))
            if held < best:
                best, best_state = held, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
        return best
    return float(loss.detach())


def train_value(policy, item_rounds: list[list], *, beta: float, top_k: int | None, max_new_tokens: int,
                epochs: int = 200, lr: float = 1e-2, weight_decay: float = 0.0, val_frac: float = 0.0,
                seed: int = 0, rollout_model=None, indirect: bool = False, all_tokens: bool = False,
                log=print) -> tuple[QHead, list[dict]]:
    """Run len(item_rounds) Q♯ rounds (one list of items per round); return the head and per-round stats.
    ``indirect``: Transfer Q*'s indirect transfer from ``rollout_model`` (aligned to another reward) at ``beta``.
    ``all_tokens``: every roll-out token is a training example (``collect``)."""
    if not beta > 0:
        raise ValueError(f"train-value beta must be > 0, got {beta!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = policy.model.config
    head = QHead(cfg.hidden_size, cfg.vocab_size)
    decoding, data, stats = Decoding("sample"), None, []
    for r, items in enumerate(item_rounds):
        new = collect(policy, items, decoding, max_new_tokens=max_new_tokens, generator=gen,
                      rollout_model=rollout_model, indirect_beta=beta if indirect else None, all_tokens=all_tokens)
        data = new if data is None else data.extend(new)
        loss = fit_head(head, data, epochs=epochs, lr=lr, weight_decay=weight_decay, val_frac=val_frac, generator=gen)
        # per roll-out mean (all_tokens repeats a roll-out's reward on its L tokens with weight 1/L)
        w = torch.softmax(new.log_weights, 0) if all_tokens else torch.full_like(new.rewards, 1 / len(new.rewards))
        reward = float((w * new.rewards).sum())
        stats.append({"round": r + 1, "examples": len(data.rewards), "rollout_reward": reward, "bce": loss})
        log(f"round {r + 1}: {len(data.rewards)} examples, roll-out reward {reward:.3f}, bce {loss:.4f}")
        kwargs = {"beta": beta} if top_k is None else {"beta": beta, "top_k": top_k}
        decoding = Decoding("qsharp", kwargs, head)
    return head, stats
