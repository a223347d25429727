"""A lean teacher-forced forward for Llama-family models: the learner's and the reference's pass.

``tilt.rollout.completion_logits`` runs each distinct prompt once and the G completions of a prompt
on top of its keys and values. Through Hugging Face's forward that is two model calls (the prompts
with a KV cache, then the completions), each dispatching ~40 modules per layer, building 4-D masks
and indexing the cache out to the rows. For the small models tilt trains on a CPU most of that time
is not arithmetic (benchmarks/README.md). ``shared_completion_logits`` computes the same function
in one pass over both parts, with grad:

* the prompt positions [U, P] and completion positions [N, T] share every per-position operation
  (norms, one fused Q/K/V matmul, the output projection, one fused gate/up matmul, the down
  projection) as one [U P + N T, H] block;
* the rotary embedding of all query and key heads at all positions is one complex product, with
  the q/k weight rows permuted so that rotate-half partners sit side by side (as in
  ``tilt.fastdecode.LeanDecoder``);
* attention is the only place they differ: a prompt attends causally within itself; a completion
  attends to its prompt's keys and causally to its own (``AttentionBlock``: the C kernel reads
  the prompt's keys in place for its rows; without it they are indexed out to each row and SDPA gets
  a boolean mask);
* the LM head runs only at the T positions whose logits are read (the prompt's last position and
  completion positions 0..T-2).

Causal attention makes this the same computation as the two-call path and as one forward over
[prompt, completion] per row (Eq. 1 of "Attention is all you need", arXiv:1706.03762, summed in
another order): logits and gradients equal Hugging Face's to float rounding
(tests/test_fastforward.py). Used for the kinds ``tilt.fastdecode.lean_supported`` accepts, with
no attention dropout, including LoRA policies (adapters applied as s B (A x) beside the base
matmul) and their adapter-disabled references; anything else keeps Hugging Face's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from tilt import kernels
from tilt.fastdecode import _complex, attention, lean_supported, linear_parts, qkv_rows, resolve


def forward_supported(model) -> bool:
    """Whether ``shared_completion_logits`` computes ``model``'s function (lean kinds, no attention dropout)."""
    return lean_supported(model) and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) == 0.0


FUSED = True  # False: torch ops even where tilt.kernels can run (A/B measurements, tests)
# the norms, SwiGLU and the attention block (AttentionBlock)


def _fused(*tensors: Tensor | None) -> bool:
    """Whether the norms and SwiGLU run as tilt.kernels' C kernels: loaded, float32 CPU contiguous."""
    return FUSED and kernels.usable(*(x for x in tensors if x is not None))


def _stacked(parts, rows: Tensor | None, mods) -> tuple[Tensor, Tensor | None]:
    """The base weights (and biases) of ``parts`` stacked into one matrix, rows in the order ``rows``.
    Frozen weights (``requires_grad`` off: a LoRA policy's base, a reference) are stacked once and kept on
    the first module until a weight is replaced or written in place (its ``_version``); trainable ones are
    stacked on every call (inside the autograd graph where grad is on), in a no-grad pass too: the fused
    optimizers (``torch.optim.AdamW(fused=True)``, tilt's) write the weights without bumping ``_version``,
    so a kept stack would hold the weights from before the step (the learner-log-prob pass of a correction
    computed log pi_old with them until this was found; tests/test_fastforward.py)."""
    weights = [p[0] for p in parts]
    if len(parts) == 1 and rows is None:
        return parts[0][0], parts[0][1]
    frozen = not any(w.requires_grad or (b is not None and b.requires_grad) for w, b, _ in parts)
    sig = tuple((w.data_ptr(), w._version, w.shape, w.dtype) for w in weights) + tuple(
        None if b is None else (b.data_ptr(), b._version) for _, b, _ in parts)
    if frozen:
        kept = getattr(mods[0], "_tilt_stacked", None)
        if kept is not None and kept[0] == sig and (kept[1] is None if rows is None else
                                                     kept[1] is not None and torch.equal(kept[1], rows)):
            return kept[2], kept[3]
    w = torch.cat(weights) if len(parts) > 1 else weights[0]
    bias = None
    if any(p[1] is not None for p in parts):
        bias = torch.cat([p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in parts])
    if rows is not None:
        w, bias = w.index_select(0, rows), (None if bias is None else bias.index_select(0, rows))
    if frozen:
        mods[0].__dict__["_tilt_stacked"] = (sig, rows, w.detach(), None if bias is None else bias.detach())
    return w, bias


def _project(x: Tensor, mods, adapters: bool, rows: Tensor | None = None, add: Tensor | None = None,
             into_add: bool = False) -> Tensor:
    """The outputs of several projections of ``x`` side by side, [.., sum out]: one matmul with their
    stacked base weights (``_stacked``), plus the LoRA adapters s B (A x) of all of them as one more
    pair of matmuls: every adapter's A stacked, [R, in], and the s B blocks placed on the block
    diagonal of a [sum out, R] matrix (R = the ranks summed), added by ``addmm`` in the same call.
    The adapters stay apart from the weights, so the backward keeps only x and A x for them (a merged
    weight would be kept whole). ``rows``: the output columns in this order (a permutation of them).
    ``add``: a tensor of the output's shape added to it (the residual stream), inside the product where
    there is no bias (``addmm``: one pass over the output fewer than a separate addition). ``into_add``: ``add``
    is not read again (a pass without autograd), so the product is added into it in place (``addmm_``): the same
    call on the same values without first copying ``add`` into a new output."""
    parts = [linear_parts(m, adapters) for m in mods]
    w, bias = _stacked(parts, rows, mods)
    if add is not None and bias is None and x.dim() == 2:
        y = add.addmm_(x, w.t()) if into_add and INTO_ADD else torch.addmm(add, x, w.t())
    else:
        y = F.linear(x, w, bias)
        y = y if add is None else y + add
    loras = [(i, a_w, b_w, scale) for i, (_, _, ls) in enumerate(parts) for a_w, b_w, scale in ls]
    if not loras:
        return y
    a_all = torch.cat([a for _, a, _, _ in loras]) if len(loras) > 1 else loras[0][1]  # [R, in]
    offsets = [0]  # first output row of each projection
    for p in parts:
        offsets.append(offsets[-1] + p[0].shape[0])
    b_all = x.new_zeros(offsets[-1], a_all.shape[0])  # [sum out, R]: zero where a projection has no adapter
    c = 0
    for i, _, b, scale in loras:
        b_all[offsets[i]:offsets[i + 1], c:c + b.shape[1]] = b * scale
        c += b.shape[1]
    if rows is not None:
        b_all = b_all.index_select(0, rows)
    ax = F.linear(x, a_all)  # [.., R]
    flat = torch.addmm(y.reshape(-1, y.shape[-1]), ax.reshape(-1, ax.shape[-1]), b_all.t())
    return flat.view(y.shape)


# without autograd: _project's into_add taken and SwiGLU by swiglu_into (False: new outputs; speed work 49)
INTO_ADD = True


def swiglu_into(gu: Tensor) -> Tensor:
    """``SwiGLU`` of ``gu`` [rows, 2 I] written into its gate half, for a pass without autograd (nothing kept for a
    backward, gu not read again): the same values as ``SwiGLU.apply`` (the same kernel), as the view ``gu[:, :I]``,
    without a new [rows, I] output."""
    return kernels.silu_mul_gate(gu)


class RMSNorm(torch.autograd.Function):
    """``F.rms_norm(x, (H,), w, eps)`` over the last dimension with a hand-written backward.

    y = x r w with r = (mean_j x_j^2 + eps)^(-1/2) per position (Eq. 4 of "Root Mean Square Layer
    Normalization", arXiv:1910.07467). With g = dy w (elementwise):

        dx = r g - x r^3 (g . x) / H,        dw = sum over positions of dy x r

    On CPU ``F.rms_norm`` runs as ~6 autograd operators forward and ~10 backward, each a pass over
    [M, H]; this is 4 passes forward and 5 backward (3 more for a trained weight), most of them in
    place. Forward values equal ``F.rms_norm``'s, gradients to float rounding
    (tests/test_fastforward.py); speed: benchmarks/README.md, speed work 29."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, eps: float) -> Tensor:
        ctx.fused = _fused(x, w)
        if ctx.fused:  # tilt.kernels: one walk over the rows (r kept flat, [M])
            y, r = kernels.rms_norm_forward(x.view(-1, x.shape[-1]), w, eps)
            ctx.save_for_backward(x, w, r)
            return y.view(x.shape)
        r = torch.rsqrt(torch.linalg.vecdot(x, x).div_(x.shape[-1]).add_(eps)).unsqueeze(-1)  # [..., 1]
        ctx.save_for_backward(x, w, r)
        y = x * r
        return y if w is None else y.mul_(w)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w, r = ctx.saved_tensors
        if ctx.fused:
            dx, dw = kernels.rms_norm_backward(x.view(-1, x.shape[-1]), w, r, dy.reshape(-1, x.shape[-1]).contiguous(),
                                               ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[1])
            return None if dx is None else dx.view(x.shape), dw, None
        g = dy if w is None else dy * w
        c = torch.linalg.vecdot(g, x).unsqueeze(-1).mul_(r.pow(3)).div_(x.shape[-1])  # r^3 (g . x) / H
        dx = None
        if ctx.needs_input_grad[0]:  # in g's buffer when g is ours (dy belongs to autograd)
            dx = (g * r if w is None else g.mul_(r)).addcmul_(x, c, value=-1.0)
        dw = None
        if w is not None and ctx.needs_input_grad[1]:
            dw = (x * r).mul_(dy).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None


def rms_norm(x: Tensor, w: Tensor | None, eps: float) -> Tensor:
    """RMS norm over the last dimension (``RMSNorm``)."""
    return RMSNorm.apply(x, w, eps)


# SwiGLU's kernel backward writes the gate/up gradient over its saved input, the fused projection's output, which
# nothing else reads, and moves that tensor's version on (speed work 50; False: a new [rows, 2 I] buffer). The same
# values: no fresh 35 MB a layer at 10M x 64 to fault in and write.
GRAD_INTO_INPUT = True


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up for gate/up side by side in one tensor [..., 2 I] (the fused projection's output;
    Eq. 6 of "GLU Variants Improve Transformer", arXiv:2002.05202, with Swish_1 = SiLU).

    Autograd over ``chunk``, ``silu`` and ``mul`` builds the [.., 2 I] gradient with a ``cat`` of its
    two halves; here both halves are written into one buffer (the same tensors are kept: the input
    and silu(gate)):

        d gate = silu'(gate) (dy * up),        d up = dy * silu(gate)

    (``silu_backward``, the kernel autograd calls). The same operators on the same values: outputs and
    gradients equal the plain expression's bit for bit (tests/test_fastforward.py). With the kernels the gradient
    is written over the saved input (``GRAD_INTO_INPUT``)."""

    @staticmethod
    def forward(ctx, gu: Tensor) -> Tensor:
        ctx.fused = _fused(gu)
        if ctx.fused:  # tilt.kernels: silu(gate) is recomputed in the backward instead of kept
            ctx.save_for_backward(gu)
            flat = gu.view(-1, gu.shape[-1])
            return kernels.silu_mul(flat).view(*gu.shape[:-1], gu.shape[-1] // 2)
        gate, up = gu.chunk(2, -1)
        s = F.silu(gate)
        ctx.save_for_backward(gu, s)
        return s * up

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        if ctx.fused:
            (gu,) = ctx.saved_tensors
            flat = gu.view(-1, gu.shape[-1])
            into = GRAD_INTO_INPUT
            out = kernels.swiglu_backward(flat, dy.reshape(flat.shape[0], -1).contiguous(), into=into).view(gu.shape)
            if into:
                torch.autograd.graph.increment_version(gu)
            return out
        gu, s = ctx.saved_tensors
        gate, up = gu.chunk(2, -1)
        out = torch.empty_like(gu)
        d_gate, d_up = out.chunk(2, -1)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=d_gate)
        torch.mul(dy, s, out=d_up)
        return out


def attention_by_splits(y: Tensor, rot: Tensor, inverse: Tensor, mask_p: Tensor, mask_c: Tensor, u: int, p: int,
                        n: int, t: int, nq: int, nkv: int, d: int, scale: float) -> Tensor:
    """``AttentionBlock``'s function in torch ops under autograd (where the kernel cannot run, and the
    tests' reference): the rotation, then q, k and v split into their prompt and completion parts; each
    row's copy of its prompt's keys and values concatenated with its own, with the boolean mask ``mask_c``
    [N, 1, T, P + T] for SDPA. Returns [M + N T, nq d]."""
    m, rows = u * p, y.shape[0]
    # split, not slices: a slice's backward writes its gradient into a zero-filled copy of all of y
    qk, v = y.split([(nq + nkv) * d, nkv * d], -1)
    qk = torch.view_as_complex(qk.reshape(rows, nq + nkv, d // 2, 2)) * rot
    q, k = torch.view_as_real(qk).view(rows, (nq + nkv) * d).split([nq * d, nkv * d], -1)
    # prompt and completion parts by split: the backward of two slices would zero-fill two full-size
    # gradients and add them
    (qp, qc), (kp, kc), (vp, vc) = (z.split([m, n * t]) for z in (q, k, v))
    qp, kp, vp = _heads(qp, u, p, nq, d), _heads(kp, u, p, nkv, d), _heads(vp, u, p, nkv, d)
    qc, kc, vc = _heads(qc, n, t, nq, d), _heads(kc, n, t, nkv, d), _heads(vc, n, t, nkv, d)
    op = attention(qp, kp, vp, mask_p, scale)  # [U, nq, P, d]
    keys = torch.cat([kp.index_select(0, inverse), kc], 2)  # [N, nkv, P + T, d]
    values = torch.cat([vp.index_select(0, inverse), vc], 2)
    oc = attention(qc, keys, values, mask_c, scale).transpose(1, 2)  # [N, T, nq, d]
    return torch.cat([op.transpose(1, 2).reshape(m, nq * d), oc.reshape(n * t, nq * d)])


class AttentionBlock(torch.autograd.Function):
    """The attention of one layer of the shared-prompt pass, from the fused q/k/v product ``y`` [M + N T,
    (nq + 2 nkv) d] (the U P prompt positions first, then the N T completion positions) to the output
    projection's input [M + N T, nq d], as one autograd node: rotary embedding of the prompts' queries and
    keys (one complex product), the prompts' causal attention (SDPA, as ``attention``), the completions'
    attention over their prompt's keys and their own (``tilt.kernels.tf_attention``, which rotates the
    completions' queries and keys as it reads them and writes its output into its rows of the result).

    Through autograd the same computation is a chain of splits and views: each split's backward
    concatenates its pieces' gradients into a new tensor (the prompt/completion split of q, k and v, then
    q from k, then q/k from v: five copies of the layer's q/k/v gradient per layer), the rotation's
    backward writes another, and the output is a concatenation. Here the backward writes every gradient
    once into one [M + N T, (nq + 2 nkv) d] buffer (the kernel through strides, its dq and dk already
    un-rotated: the gradient of x e^{i a} is g e^{-i a}), then un-rotates the prompts' query and key columns
    in place. Neither direction writes or keeps a rotated copy of the completions' queries and keys. The
    same operations on the same values: outputs and gradients equal the split path's to float rounding
    (tests/test_kernels.py)."""

    @staticmethod
    def forward(ctx, y, rot, inverse, valid_p, valid_c, mask_p, u, p, n, t, nq, nkv, d, scale, graph):
        m, rows = u * p, y.shape[0]
        w = (nq + nkv) * d
        # the prompts' queries and keys rotated here (SDPA's and the kernel's prompt keys); the completions'
        # are rotated inside the kernel as it reads them (speed work 37)
        qk = torch.view_as_real(torch.view_as_complex(y[:m, :w].unflatten(-1, (nq + nkv, d // 2, 2))) * rot[:m])
        qk = qk.view(m, w)  # [M, (nq + nkv) d], rotated
        qp, kp = _heads(qk[:, :nq * d], u, p, nq, d), _heads(qk[:, nq * d:], u, p, nkv, d)
        vp = _heads(y[:m, w:], u, p, nkv, d)
        qc, kc, vc = _completion_heads(y, m, n, t, nq, nkv, d)
        rot_c = rot[m:].view(n, t, d // 2)
        o = y.new_empty(rows, nq * d)
        with torch.set_grad_enabled(graph):  # graph: the prompts' attention keeps its own for the backward
            leaves = [x.detach().requires_grad_(graph) for x in (qp, kp, vp)]
            op = attention(*leaves, mask_p, scale)  # [U, nq, P, d]
        o[:m].view(u, p, nq, d).copy_(op.detach().transpose(1, 2))
        _, lse = kernels.tf_attention(qc, kp, vp, kc, vc, inverse, valid_p, valid_c, scale,
                                      out=o[m:].view(n, t, nq, d), rot=rot_c)
        ctx.save_for_backward(qk, y, rot, inverse, valid_p, valid_c, o, lse)
        ctx.prompt = (op, leaves)
        ctx.dims = (u, p, n, t, nq, nkv, d, scale)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        do = do.contiguous()
        qk, y, rot, inverse, valid_p, valid_c, o, lse = ctx.saved_tensors
        (op, leaves), (u, p, n, t, nq, nkv, d, scale) = ctx.prompt, ctx.dims
        m, rows, w = u * p, y.shape[0], (nq + nkv) * d
        kp, vp = _heads(qk[:, nq * d:], u, p, nkv, d), _heads(y[:m, w:], u, p, nkv, d)
        qc, kc, vc = _completion_heads(y, m, n, t, nq, nkv, d)
        dy = y.new_empty(rows, y.shape[1])
        dq, dk, dv = dy[:, :nq * d], dy[:, nq * d:w], dy[:, w:]
        dkp_rows, dvp_rows = y.new_empty(n, nkv, p, d), y.new_empty(n, nkv, p, d)  # per row: summed below
        kernels.tf_attention_backward(
            qc, kp, vp, kc, vc, inverse, valid_p, valid_c, o[m:].view(n, t, nq, d), lse,
            do[m:].view(n, t, nq, d), scale,
            out=(_view_heads(dq[m:], n, t, nq, d), dkp_rows, _view_heads(dk[m:], n, t, nkv, d), dvp_rows,
                 _view_heads(dv[m:], n, t, nkv, d)), rot=rot[m:].view(n, t, d // 2))
        dqp, dkp, dvp = torch.autograd.grad(op, leaves, do[:m].view(u, p, nq, d).transpose(1, 2))
        dkp = dkp.index_add(0, inverse, dkp_rows)  # [U, nkv, P, d]: each prompt's rows summed
        dvp = dvp.index_add(0, inverse, dvp_rows)
        dq[:m].view(u, p, nq, d).copy_(dqp.transpose(1, 2))
        dk[:m].view(u, p, nkv, d).copy_(dkp.transpose(1, 2))
        dv[:m].view(u, p, nkv, d).copy_(dvp.transpose(1, 2))
        # the kernel wrote the completions' dq and dk for the unrotated y; the prompts' are un-rotated here
        torch.view_as_complex(dy[:m, :w].unflatten(-1, (nq + nkv, d // 2, 2))).mul_(rot[:m].conj())
        return dy, *([None] * 14)


def _heads(x: Tensor, b: int, length: int, heads: int, d: int) -> Tensor:
    """[b * length, heads * d] -> [b, heads, length, d]."""
    return x.reshape(b, length, heads, d).transpose(1, 2)


def _completion_heads(y: Tensor, m: int, n: int, t: int, nq: int, nkv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """The completions' q, k and v of the q/k/v product ``y`` [M + N T, (nq + 2 nkv) d] as unrotated
    [N, heads, T, d] views (rows from ``m`` on)."""
    w = (nq + nkv) * d
    return _heads(y[m:, :nq * d], n, t, nq, d), _heads(y[m:, nq * d:w], n, t, nkv, d), _heads(y[m:, w:], n, t, nkv, d)


def _view_heads(x: Tensor, b: int, length: int, heads: int, d: int) -> Tensor:
    """``_heads`` as a view of ``x`` (an error rather than a copy), for tensors written through."""
    return x.view(b, length, heads, d).transpose(1, 2)


def shared_completion_logits(model, u_ids: Tensor, u_mask: Tensor, inverse: Tensor, completion_ids: Tensor,
                             completion_mask: Tensor) -> Tensor:
    """Teacher-forced logits at the completion positions, [N, T, V], for rows whose prompts are the
    left-padded distinct prompts ``u_ids``/``u_mask`` [U, P] (row r has prompt ``inverse[r]``) followed
    by right-padded completions [N, T]. Positions ignore left padding (as ``completion_logits``). Grad
    flows to the model's weights when enabled."""
    inner, adapters = resolve(model)
    states = shared_completion_states(model, u_ids, u_mask, inverse, completion_ids, completion_mask)
    return _project(states, (inner.lm_head,), adapters)  # [N, T, V]


def shared_completion_states(model, u_ids: Tensor, u_mask: Tensor, inverse: Tensor, completion_ids: Tensor,
                             completion_mask: Tensor) -> Tensor:
    """What the LM head reads at the completion positions, [N, T, H] (the last layer's output after the
    final norm; the state before token t), for ``shared_completion_logits``'s inputs."""
    model, adapters = resolve(model)
    cfg, base = model.config, model.model
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    attn0 = base.layers[0].self_attn
    d, scale = attn0.head_dim, attn0.scaling
    u, p = u_ids.shape
    n, t = completion_ids.shape
    m = u * p
    hidden = cfg.hidden_size
    dev = u_ids.device

    pos_p = (u_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
    pos_c = (torch.cat([u_mask.index_select(0, inverse), completion_mask], 1).cumsum(-1) - 1).clamp(min=0)[:, p:]  # [N, T]
    emb = base.embed_tokens
    h = torch.cat([emb(u_ids).reshape(m, hidden), emb(completion_ids).reshape(n * t, hidden)])  # [M + N T, H]
    positions = torch.cat([pos_p.reshape(m), pos_c.reshape(n * t)])[None]  # [1, M + N T]
    rot = _complex(*base.rotary_emb(h, positions))[0, :, None]  # [M + N T, 1, d/2]: e^{i p theta}
    # q and k rows with each rotate-half pair side by side: the rotation is one complex product
    # (Eq. 34 of RoFormer, arXiv:2104.09864, in complex form); scores are unchanged (same layout for both)
    rows = qkv_rows(nq, nkv, d, dev)

    # attention masks, True = attend. A prompt's padding query sees itself, so no row is all -inf.
    ar_p, ar_t = torch.arange(p, device=dev), torch.arange(t, device=dev)
    valid_p = u_mask.bool()  # [U, P]
    mask_p = ((ar_p[None, :] <= ar_p[:, None])[None] & valid_p[:, None, :]) | torch.eye(p, dtype=torch.bool, device=dev)
    mask_p = mask_p[:, None]  # [U, 1, P, P]
    valid_c = completion_mask.bool()
    fused, mask_c = None, None  # whether the attention block takes the kernel (decided at the first layer)
    keep_none = not torch.is_grad_enabled()  # no autograd: the residual stream h (a new tensor) is updated in place

    for layer in base.layers:
        a, mlp = layer.self_attn, layer.mlp
        x = rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        y = _project(x, (a.q_proj, a.k_proj, a.v_proj), adapters, rows)  # [M + N T, (nq + 2 nkv) d]
        if fused is None:  # whether the kernel takes these heads (float32 CPU, d a multiple of 16), decided once
            fused = FUSED and kernels.tf_attention_usable(*[y.view(y.shape[0], -1, d)] * 5)
        if fused:
            o = AttentionBlock.apply(y, rot, inverse, valid_p, valid_c, mask_p, u, p, n, t, nq, nkv, d, scale,
                                     torch.is_grad_enabled() and y.requires_grad)
        else:
            if mask_c is None:
                to_prompt = valid_p.index_select(0, inverse)[:, None, :].expand(n, t, p)  # [N, T, P]
                to_self = (ar_t[None, :] <= ar_t[:, None])[None] & valid_c[:, None, :]  # [N, T, T]
                mask_c = torch.cat([to_prompt, to_self], -1)[:, None]  # [N, 1, T, P + T]
            o = attention_by_splits(y, rot, inverse, mask_p, mask_c, u, p, n, t, nq, nkv, d, scale)
        # [M + N T, H]: the residual added inside the product
        h = _project(o, (a.o_proj,), adapters, add=h, into_add=keep_none)
        x = rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gu = _project(x, (mlp.gate_proj, mlp.up_proj), adapters)  # [M + N T, 2 I]
        act = swiglu_into(gu) if keep_none and INTO_ADD and _fused(gu) else SwiGLU.apply(gu)
        h = _project(act, (mlp.down_proj,), adapters, add=h, into_add=keep_none)

    h_p, h_c = h.split([m, n * t])
    last = h_p.reshape(u, p, hidden)[:, -1].index_select(0, inverse)  # [N, H]: predicts completion token 0
    states = torch.cat([last[:, None], h_c.reshape(n, t, hidden)[:, :-1]], 1)  # [N, T, H]
    return rms_norm(states, base.norm.weight, base.norm.variance_epsilon)  # [N, T, H]
