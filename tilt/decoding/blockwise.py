"""E4 blockwise controlled decoding (Mudgal et al., "Controlled Decoding from Language Models",
arXiv:2310.17022, §"blockwise CD"): from the current prefix draw K continuations of ``block_len``
tokens from pi_ref, score each with the prefix scorer V(x, y^t · z), keep the best (the paper's rule;
or, with ``beta``, one drawn ∝ exp(V / beta)), append it and repeat until EOS or the token budget.

``blockwise_decode`` is the loop and nothing else: it is a pure function of three callables, so the
same code runs on a causal LM (``tilt.decoding.lm``: pi_ref = the model, V = the Q head's
E[r | s, a] at the block's last token) and on an exact token tree (tests), where its sequence law
is ``tilt.exact.blockwise_k_sequences``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

# propose(rows [N], prefix ids [N, t], length L) -> (block ids [N, L], block mask [N, L], log pi_ref [N, L])
Propose = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]]
# score(rows [N], ids [N, t+L], mask [N, t+L]) -> V(prefix · block) [N]
Score = Callable[[Tensor, Tensor, Tensor], Tensor]


def select_block(scores: Tensor, *, beta: Optional[float] = None, generator: torch.Generator | None = None) -> Tensor:
    """Index of the kept block per row. scores [B, K] -> [B].

    beta None: argmax, ties to the first draw (blockwise CD as in the paper: best-of-K per block);
    beta > 0: drawn ∝ exp(score / beta) (tends to pi_ref(z) exp(V / beta) / Z as K grows).
    """
    if beta is None:
        return scores.argmax(-1)
    if not beta > 0:
        raise ValueError(f"controlled_block beta must be > 0 (or null for argmax), got {beta!r}")
    return torch.multinomial(torch.softmax(scores / beta, -1), 1, generator=generator).squeeze(-1)


def check_block_kwargs(k, block_len) -> None:
    """K >= 1 candidate blocks of block_len >= 1 tokens, both integers."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"controlled_block needs k >= 1 candidate blocks (an integer), got k={k!r}")
    if not isinstance(block_len, int) or isinstance(block_len, bool) or block_len < 1:
        raise ValueError(f"controlled_block needs block_len >= 1 tokens (an integer), got block_len={block_len!r}")


@torch.no_grad()
def blockwise_decode(n_rows: int, *, propose: Propose, score: Score, select: Callable[[Tensor], Tensor], k: int,
                     block_len: int, max_new_tokens: int, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Blockwise CD for ``n_rows`` prompts; returns completions (ids [B, T], mask [B, T], log pi_ref [B, T]).

    Each round, every unfinished row draws K blocks (rows repeated K times), the K scores go to
    ``select`` as [A, K], the chosen block is appended; a row whose block holds EOS is finished.
    Unfinished rows always hold a full prefix (every earlier block had L tokens and no EOS).
    """
    check_block_kwargs(k, block_len)
    ids = torch.zeros(n_rows, 0, dtype=torch.long)  # [B, t]
    mask = torch.zeros(n_rows, 0, dtype=torch.long)
    logp = torch.zeros(n_rows, 0)
    done = torch.zeros(n_rows, dtype=torch.bool)
    t = 0
    while t < max_new_tokens and not bool(done.all()):
        length = min(block_len, max_new_tokens - t)
        active = (~done).nonzero().squeeze(-1)  # [A]
        rows = active.repeat_interleave(k)  # [A*K]
        blocks, bmask, blogp = propose(rows, ids[rows], length)  # [A*K, L] each
        scores = score(rows, torch.cat([ids[rows], blocks], 1), torch.cat([mask[rows], bmask], 1))  # [A*K]
        pick = select(scores.reshape(-1, k))  # [A]
        chosen = torch.arange(active.numel()) * k + pick  # [A]
        new_ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
        new_mask = torch.zeros(n_rows, length, dtype=torch.long)
        new_logp = torch.zeros(n_rows, length, dtype=logp.dtype)
        new_ids[active], new_mask[active] = blocks[chosen], bmask[chosen]
        new_logp[active] = blogp[chosen].to(logp.dtype)
        ids, mask, logp = torch.cat([ids, new_ids], 1), torch.cat([mask, new_mask], 1), torch.cat([logp, new_logp], 1)
        done[active] = ((blocks[chosen] == eos_id) & bmask[chosen].bool()).any(-1)
        t += length
    return ids, mask, logp
