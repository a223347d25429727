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


def _stats(flat: Tensor, y: Tensor, scale: float, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp [M], lse [M], entropy [M] or None) of logits ``flat`` [M, V] at tokens ``y`` [M, 1], block by block."""
    vocab, m = flat.shape[-1], flat.shape[0]
    out_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    lse = torch.empty(m, dtype=out_dtype, device=flat.device)
    ent = torch.empty(m, dtype=out_dtype, device=flat.device) if with_entropy else None
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
    logp = _scaled(flat.gather(1, y).squeeze(1), scale) - lse  # [M]
    return logp, lse, ent


def _logits_grad(flat: Tensor, grad: Tensor, y: Tensor, lse: Tensor, ent: Tensor | None, g_logp: Tensor,
                 g_ent: Tensor | None, scale: float) -> Tensor:
    """d(sum g_logp logp + g_ent H) / d logits into ``grad`` [M, V] (may be ``flat`` itself: each block
    is read before it is written), from the logits ``flat`` and the forward's lse and entropy."""
    vocab = flat.shape[-1]
    use_ent = ent is not None and g_ent is not None and bool(g_ent.any())
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
    return grad


class _ChosenLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, scale: float, with_entropy: bool):
        flat = logits.reshape(-1, logits.shape[-1])  # [M, V]
        y = ids.reshape(-1, 1)
        logp, lse, ent = _stats(flat, y, scale, with_entropy)
        ctx.save_for_backward(logits, y, lse, ent)
        ctx.scale = scale
        shape = logits.shape[:-1]
        return logp.view(shape), (ent.view(shape) if ent is not None else lse.new_zeros(shape))

    @staticmethod
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):
        logits, y, lse, ent = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = _logits_grad(flat, torch.empty_like(flat), y, lse, ent, g_logp.reshape(-1),
                            None if g_ent is None else g_ent.reshape(-1), ctx.scale)
        return grad.view_as(logits), None, None, None


class _Workspace:
    """One logits buffer per (device, dtype), reused by every ``head_token_logprobs`` call: the [M, V]
    logits of a large vocabulary are hundreds of MB, and a fresh allocation of that size is paid for
    again in page faults on every pass. A call takes the buffer (``owner`` = its ticket); its backward
    finds its logits intact only if no later call took the buffer since, and recomputes them otherwise."""

    def __init__(self):
        self.buffers: dict[tuple, Tensor] = {}
        self.owner: dict[tuple, int] = {}
        self.tickets = 0

    def take(self, m: int, v: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < m * v:
            self.buffers.pop(key, None)
            buf = self.buffers[key] = torch.empty(m * v, dtype=dtype, device=device)
        self.tickets += 1
        self.owner[key] = self.tickets
        return buf[:m * v].view(m, v), self.tickets

    def holds(self, dtype: torch.dtype, device: torch.device, ticket: int) -> bool:
        return self.owner.get((device, dtype)) == ticket

    def release(self, dtype: torch.dtype, device: torch.device, ticket: int) -> None:
        if self.holds(dtype, device, ticket):
            self.owner[(device, dtype)] = 0


WORKSPACE = _Workspace()


def _head(h: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    torch.mm(h, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


class _HeadChosenLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, scale: float,
                with_entropy: bool):
        m, v = h.shape[0], weight.shape[0]
        logits, ticket = WORKSPACE.take(m, v, h.dtype, h.device)
        _head(h, weight, bias, logits)  # [M, V]
        y = ids.reshape(-1, 1)
        logp, lse, ent = _stats(logits, y, scale, with_entropy)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(h, weight, bias, y, lse, ent)
            ctx.scale, ctx.ticket, ctx.logits = scale, ticket, logits
        else:
            WORKSPACE.release(h.dtype, h.device, ticket)
        return logp, (ent if ent is not None else lse.new_zeros(m))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):
        h, weight, bias, y, lse, ent = ctx.saved_tensors
        logits = ctx.logits
        if logits is None:  # released by this node's first backward (its buffer and SwiGLU's inputs are reused)
            raise RuntimeError("head_token_logprobs: the backward through these log-probs already ran; a second "
                               "backward (retain_graph=True) through tilt's lean pass is not supported: compute the "
                               "log-probs again for another backward")
        if not WORKSPACE.holds(h.dtype, h.device, ctx.ticket):  # a later pass took the buffer: recompute
            logits = _head(h, weight, bias, torch.empty_like(logits))
        grad = _logits_grad(logits, logits, y, lse, ent, g_logp, g_ent, ctx.scale)  # in place of the logits
        g_h = grad @ weight if ctx.needs_input_grad[0] else None  # [M, H]
        g_w = grad.t() @ h if ctx.needs_input_grad[1] else None  # [V, H]
        g_b = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        WORKSPACE.release(h.dtype, h.device, ctx.ticket)
        ctx.logits = None
        return g_h, g_w, g_b, None, None, None


def head_token_logprobs(states: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, *,
                        temperature: float = 1.0, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``token_logprobs(F.linear(states, weight, bias), ids, ...)`` with the LM head inside: the logits
    [M, V] go to a buffer reused across calls (``WORKSPACE``) and their gradient is written over them
    in the backward, so a pass allocates no vocabulary-sized tensor. states [..., H], ids [...]."""
    scale = 1.0 / temperature if temperature > 0 else 1.0
    shape = ids.shape
    logp, ent = _HeadChosenLogSoftmax.apply(states.reshape(-1, states.shape[-1]), weight, bias, ids.reshape(-1),
                                            scale, entropy)
    return logp.view(shape), (ent.view(shape) if entropy else None)


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
