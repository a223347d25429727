"""Log-probabilities of chosen tokens (and the entropy) without materialising log-softmax over the vocabulary.

For logits z (scaled by s = 1 / temperature) at one position and chosen token y:

    lse   = log sum_v exp(s z_v)
    logp  = s z_y - lse
    H     = -sum_v p_v log p_v = lse - sum_v p_v s z_v,          p = softmax(s z)

and the gradients (a softmax's Jacobian):

    d logp / d z_v = s (1[v = y] - p_v)
    d H    / d z_v = -s p_v (log p_v + H)

The plain path (``log_softmax(z / T)`` then ``gather``, entropy as ``-(exp(l) * l).sum()``) writes four
[positions, V] tensors in the forward (the division, the log-softmax, its exp, the product) and keeps them
for the backward. This function works over blocks of positions small enough to stay in cache, keeps only
the logits and one number per position, and recomputes p block by block in the backward. With
SmolLM2's 49,152-token vocabulary that vocabulary-wide work was about 10 % of a LoRA step
(benchmarks/README.md, speed work 21). The numbers equal the plain path's
(tests/test_token_logprobs.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 19  # positions per block x V: 2 MiB of float32, within a core's L2


def _rows(vocab: int) -> int:
    return max(1, BLOCK_ELEMENTS // vocab)


def _scaled(z: Tensor, scale: float) -> Tensor:
    """One block of logits as float32 (float64 kept), times ``scale`` (no copy when there is nothing to do)."""
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return z if scale == 1.0 else z * scale


class _ChosenLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, scale: float, with_entropy: bool):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # [M, V]
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        m = flat.shape[0]
        lse = torch.empty(m, dtype=out_dtype, device=logits.device)
        ent = torch.empty(m, dtype=out_dtype, device=logits.device) if with_entropy else None
        step = _rows(vocab)
        for a in range(0, m, step):
            z = _scaled(flat[a:a + step], scale)  # [b, V]
            if ent is None:
                lse[a:a + step] = torch.logsumexp(z, -1)  # [b]
                continue
            top = z.amax(-1, keepdim=True)  # [b, 1]
            d = z - top  # [b, V], <= 0
            e = d.exp()  # p = e / sum e
            total = e.sum(-1)  # [b]
            log_total = total.log()
            lse[a:a + step] = top.squeeze(-1) + log_total
            ent[a:a + step] = log_total - e.mul_(d).sum(-1) / total  # H = -sum p log p, log p = d - log sum e
        y = ids.reshape(-1, 1)
        logp = _scaled(flat.gather(1, y).squeeze(1), scale) - lse  # [M]
        ctx.save_for_backward(logits, y, lse, ent)
        ctx.scale = scale
        shape = logits.shape[:-1]
        return logp.view(shape), (ent.view(shape) if ent is not None else lse.new_zeros(shape))

    @staticmethod
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):
        logits, y, lse, ent = ctx.saved_tensors
        scale = ctx.scale
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        g_logp = g_logp.reshape(-1)
        use_ent = ent is not None and g_ent is not None and bool(g_ent.any())
        if use_ent:
            g_ent = g_ent.reshape(-1)
        grad = torch.empty_like(flat)
        low = flat.dtype not in (torch.float32, torch.float64)  # half logits: the block is worked in float32
        step = _rows(vocab)
        for a in range(0, flat.shape[0], step):
            b = slice(a, a + step)
            z = flat[b]
            g = torch.empty(z.shape, dtype=torch.float32, device=z.device) if low else grad[b]  # [b, V]
            if low or scale != 1.0:  # g = s z - lse = log p
                g.copy_(z) if low else torch.mul(z, scale, out=g)
                if low and scale != 1.0:
                    g.mul_(scale)
                g.sub_(lse[b, None])
            else:
                torch.sub(z, lse[b, None], out=g)
            if use_ent:  # d/dz of g_logp * logp + g_ent * H is s p (-g_logp - g_ent (log p + H)) + s g_logp 1[v = y]
                w = g.add(ent[b, None]).mul_(-g_ent[b, None]).sub_(g_logp[b, None])
                g.exp_().mul_(w)
            else:
                g.exp_().mul_(-g_logp[b, None])
            g.scatter_add_(1, y[b], g_logp[b, None].to(g.dtype))
            if scale != 1.0:
                g.mul_(scale)
            if low:
                grad[b] = g
        return grad.view_as(logits), None, None, None


def token_logprobs(logits: Tensor, ids: Tensor, *, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature) at ``ids`` and (if ``entropy``) the entropy of that softmax.

    logits [..., V] (any float dtype; computed in float32, float64 kept), ids [...] (long). Returns
    (logp [...], entropy [...] or None), float32 (float64 for float64 logits), differentiable in logits.
    ``temperature <= 0`` (greedy) is treated as 1, as the plain path's log-softmax of raw logits is.
    """
    scale = 1.0 / temperature if temperature > 0 else 1.0
    logp, ent = _ChosenLogSoftmax.apply(logits, ids, scale, entropy)
    return logp, (ent if entropy else None)
