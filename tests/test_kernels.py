"""tilt.kernels: the fused C decode and teacher-forced-pass kernels equal the torch expressions they replace,
the grouped decoder samples the same tokens with and without them, the lean pass gives the same logits and
gradients, and a machine that cannot build them keeps torch ops."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tilt import kernels
from tilt.fastdecode import GroupedDecoder
from tilt.model import load_policy
from tilt.rollout import encode_prompts, unique_prompts


def test_kernels_load_where_a_compiler_is():
    """On a Linux machine with a C compiler (CI's) the kernels build, pass their self-check and load;
    without one the status names the missing compiler."""
    if os.environ.get("TILT_KERNELS", "1") == "0":
        assert kernels.library() is None and "TILT_KERNELS" in kernels.status()
    elif sys.platform.startswith("linux") and kernels._compiler() is not None:
        assert kernels.library() is not None, kernels.status()
        assert kernels.status() == "loaded"
    else:
        assert kernels.library() is None
        assert "compiler" in kernels.status() or "Linux" in kernels.status()


# Skipped only where the kernels cannot exist (no compiler, not Linux, or switched off); where a
# compiler is present and the build or its self-check fails, these tests fail.
CAN_BUILD = (sys.platform.startswith("linux") and kernels._compiler() is not None
             and os.environ.get("TILT_KERNELS", "1") != "0")
needs_lib = pytest.mark.skipif(not CAN_BUILD, reason=f"tilt.kernels: {kernels.status()}")


@needs_lib
@pytest.mark.parametrize("shape", [(1, 7), (64, 256), (5, 576)])
def test_add_rms_norm_equals_f_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g)
    want_h = h + x
    want = F.rms_norm(want_h.double(), (shape[1],), None, 1e-5)
    got_h = h.clone()
    got = kernels.add_rms_norm(got_h, x, 1e-5)
    torch.testing.assert_close(got_h, want_h, atol=0, rtol=0)  # the residual stream is updated in place
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(kernels.add_rms_norm(h.clone(), None, 1e-5).double(),
                               F.rms_norm(h.double(), (shape[1],), None, 1e-5), atol=2e-6, rtol=2e-6)


@needs_lib
def test_add_rms_norm_hand_values():
    """[3, 4]: mean of squares 12.5, so the norm is [3, 4] / sqrt(12.5 + eps)."""
    h = torch.tensor([[1.0, 4.0]])
    got = kernels.add_rms_norm(h, torch.tensor([[2.0, 0.0]]), 0.0)
    torch.testing.assert_close(got, torch.tensor([[3.0, 4.0]]) / 12.5 ** 0.5, atol=1e-7, rtol=0)


@needs_lib
def test_silu_mul_equals_torch_and_handles_extremes():
    g = torch.Generator().manual_seed(1)
    gate = torch.cat([torch.randn(3, 50, generator=g) * 6,
                      torch.tensor([[-200.0, -88.5, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0, 88.5, 200.0]
                                    + [0.5] * 39])])
    up = torch.randn(4, 50, generator=g)
    gu = torch.cat([gate, up], 1).contiguous()
    got = kernels.silu_mul(gu).double()
    want = F.silu(gate.double()) * up.double()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-6)
    assert torch.isfinite(got).all()


def _f32_nearest(q) -> float:
    """The float32 nearest the rational q (ties to even), as a Python float."""
    import numpy as np
    from fractions import Fraction
    f = np.float32(float(q))
    cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.int32)) & 1)))


def _expv_steps(x: float) -> float:
    """vec16.h's expv step by step in exact arithmetic, each fused multiply-add rounded once to float32 and each
    other operation rounded as float32 rounds it: what the AVX-512 build's explicit steps must give."""
    import numpy as np
    from fractions import Fraction
    f32 = np.float32

    def fma(a, b, c):
        return f32(_f32_nearest(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))))

    v = f32(min(f32(88.0), max(f32(-87.0), f32(x))))
    big = f32(12582912.0)
    n = fma(v, f32(1.44269504088896341), big) - big
    r = fma(n, f32(2.12194440e-4), fma(n, f32(-0.693359375), v))
    p = fma(r, f32(1.9875691500e-4), f32(1.3981999507e-3))
    for c in (8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = fma(p, r, f32(c))
    e = fma(p * r, r, r) + f32(1.0)
    return float(np.ldexp(e, int(n)))


@needs_lib
def test_expv_is_its_steps_and_within_an_ulp_of_exp():
    """The exp of every fused softmax and SiLU (vec16.h's expv, speed work 51 wrote its AVX-512 steps out as fused
    multiply-adds so that a caller compiled without contraction inlines the same values): within one float ulp of
    exp over [-87, 88] (the clamp's range); NaN in, NaN out; clamped outside; and, in an AVX-512 build, equal bit
    for bit to its steps computed exactly and rounded once per fused multiply-add."""
    import math
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.linspace(-87.0, 88.0, 3001), torch.rand(1000, generator=g) * 4 - 2,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 0.34657359, 60.5, -86.99])])
    got = kernels.expv(x)
    want = torch.tensor([math.exp(v) for v in x.double().tolist()], dtype=torch.float64)
    ulp = (want.float().nextafter(torch.tensor(math.inf)) - want.float()).double()
    assert ((got.double() - want).abs() <= ulp).all(), float(((got.double() - want).abs() / ulp).max())
    edges = kernels.expv(torch.tensor([math.nan, -math.inf, -200.0, math.inf, 200.0]))
    assert math.isnan(edges[0]) and edges[1] == edges[2] == kernels.expv(torch.tensor([-87.0]))[0]
    assert edges[3] == edges[4] == kernels.expv(torch.tensor([88.0]))[0]
    if kernels.library().tilt_expv_explicit():
        steps = torch.tensor([_expv_steps(v) for v in x.tolist()], dtype=torch.float32)
        assert torch.equal(got, steps), int((got != steps).sum())


@needs_lib
@pytest.mark.parametrize("shape", [(3, 24), (64, 2048), (7, 8, 96)])
def test_swiglu_forward_and_backward_equal_float64(shape):
    """tilt.fastforward.SwiGLU on the kernels (silu_mul forward, swiglu_backward) against autograd in
    float64: output and the [gate, up] gradient within 3x the float32 torch path's own distance from
    float64 (or 2e-6 relative), gate values past exp's clamp included."""
    import tilt.fastforward as fastforward

    g = torch.Generator().manual_seed(2)
    gu = torch.randn(*shape, generator=g) * 4
    gu.view(-1)[:6] = torch.tensor([-200.0, -88.5, -30.0, 30.0, 88.5, 200.0])
    up = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)

    def run(z, fused):
        fastforward.FUSED = fused
        try:
            z = z.clone().requires_grad_()
            out = fastforward.SwiGLU.apply(z)
            (out * up.to(z.dtype)).sum().backward()
            return out.detach().double(), z.grad.double()
        finally:
            fastforward.FUSED = True

    exact = run(gu.double(), False)
    fused, plain = run(gu, True), run(gu, False)
    for got, torch_path, want in zip(fused, plain, exact):
        scale = want.abs() + 1e-3
        err, err_torch = ((got - want).abs() / scale).max(), ((torch_path - want).abs() / scale).max()
        assert err <= max(3 * err_torch, 2e-6), (err, err_torch)
        assert torch.isfinite(got).all()
    assert fused[1][..., : shape[-1] // 2].abs().max() > 0.1 and fused[1][..., shape[-1] // 2:].abs().max() > 0.1


@needs_lib
def test_swiglu_backward_hand_values():
    """gate 0: sigma = 1/2, silu = 0, silu' = 1/2; gate ln 3: sigma = 3/4, silu = 3/4 ln 3,
    silu' = 3/4 (1 + ln 3 / 4). With up = 2 and dy = 1: d gate = 2 silu', d up = silu."""
    import math

    ln3 = math.log(3.0)
    gu = torch.tensor([[0.0, ln3, 2.0, 2.0]])
    d = kernels.swiglu_backward(gu, torch.ones(1, 2))
    want = torch.tensor([[1.0, 1.5 * (1 + ln3 / 4), 0.0, 0.75 * ln3]])
    torch.testing.assert_close(d, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not match"):
        kernels.swiglu_backward(gu, torch.ones(1, 3))


@needs_lib
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4232, 256)])
def test_rms_norm_kernels_equal_float64(shape, weight):
    """rms_norm_forward / rms_norm_backward against F.rms_norm's autograd in float64: y, dx to 2e-6,
    dw (a sum over the rows, split across threads) to 2e-6 relative to its size; the per-row 1/rms."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.rand(shape[1], generator=g) + 0.5 if weight else None
    dy = torch.randn(*shape, generator=g)
    y, r = kernels.rms_norm_forward(x, w, 1e-5)
    dx, dw = kernels.rms_norm_backward(x, w, r, dy)
    xd = x.double().requires_grad_()
    wd = None if w is None else w.double().requires_grad_()
    want = F.rms_norm(xd, (shape[1],), wd, 1e-5)
    want.backward(dy.double())
    torch.testing.assert_close(y.double(), want.detach(), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(r.double(), torch.rsqrt(x.double().pow(2).mean(-1) + 1e-5), atol=0, rtol=2e-6)
    torch.testing.assert_close(dx.double(), xd.grad, atol=2e-6, rtol=2e-6)
    if weight:
        torch.testing.assert_close(dw.double(), wd.grad, atol=2e-6 * wd.grad.abs().max().item(), rtol=0)
        assert kernels.rms_norm_backward(x, w, r, dy, need_x=False)[0] is None
        torch.testing.assert_close(kernels.rms_norm_backward(x, w, r, dy, need_w=False)[0], dx, atol=0, rtol=0)
    else:
        assert dw is None


@needs_lib
def test_rms_norm_kernels_hand_values():
    """x = [3, 4], w = [1, 2], eps = 0: r = 1 / sqrt((9 + 16) / 2) = 0.282843, y = x r w = [0.848528,
    2.262742]. With dy = [1, 0]: g = dy w = [1, 0], g . x = 3, dx = r g - x r^3 3 / 2 = [0.282843 -
    3 * 0.033941, -4 * 0.033941] = [0.181019, -0.135765] (r^3 3 / 2 = 0.033941); dw = dy x r = [0.848528, 0]."""
    x, w = torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0])
    y, r = kernels.rms_norm_forward(x, w, 0.0)
    torch.testing.assert_close(y, torch.tensor([[0.848528, 2.262742]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(r, torch.tensor([0.282843]), atol=1e-6, rtol=0)
    dx, dw = kernels.rms_norm_backward(x, w, r, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(dx, torch.tensor([[0.181019, -0.135765]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(dw, torch.tensor([0.848528, 0.0]), atol=1e-6, rtol=0)


@needs_lib
def test_lean_pass_with_kernels_equals_torch_ops(tiny_llama_dir, monkeypatch):
    """The teacher-forced pass (tilt.fastforward.shared_completion_logits, shared prompts) with the norm,
    SwiGLU and attention kernels and with torch ops: logits and every weight's gradient to float rounding (and the
    kernels are called only in the first run)."""
    import tilt.fastforward as fastforward

    calls = {}
    for name in ("silu_mul", "swiglu_backward", "rms_norm_forward", "rms_norm_backward", "tf_attention",
                 "tf_attention_backward"):
        def counted(*args, _f=getattr(kernels, name), _n=name, **kw):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)

    pol = load_policy(str(tiny_llama_dir))
    ids, mask = encode_prompts(pol.tokenizer, ["47+85=", "cd 3 5 7>22:", "5+4="] * 2)
    u_ids, u_mask, inverse = unique_prompts(ids, mask)
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(3, 20, (ids.shape[0], 9), generator=g)
    cmask = torch.ones_like(comp)
    cmask[0, 6:] = 0
    runs = []
    for fused in (True, False):
        fastforward.FUSED = fused
        try:
            pol.model.zero_grad()
            logits = fastforward.shared_completion_logits(pol.model, u_ids, u_mask, inverse, comp, cmask)
            (logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1) * cmask).sum().backward()
        finally:
            fastforward.FUSED = True
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in pol.model.named_parameters()}))
        if fused:  # 2 layers: 2 SwiGLU, 5 norms (2 per layer and the final one), 2 attentions, forward and backward
            assert calls == {"silu_mul": 2, "swiglu_backward": 2, "rms_norm_forward": 5, "rms_norm_backward": 5,
                             "tf_attention": 2, "tf_attention_backward": 2}
            calls.clear()
    assert not calls
    (la, ga), (lb, gb) = runs
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)


def _tf_inputs(b, u, nq, nkv, t, p, d, seed=0):
    """Inputs of tf_attention as the pass hands them over: q and keys as transposed views of
    [rows, positions, heads, d] tensors; rows not in prompt order; padding in a prompt and a completion."""
    g = torch.Generator().manual_seed(seed)
    pidx = torch.randint(0, u, (b,), generator=g)
    pidx[:u] = torch.arange(u).flip(0)  # every prompt used
    valid_p = torch.ones(u, p, dtype=torch.bool)
    valid_p[0, : p // 2] = False  # left padding
    valid_c = torch.ones(b, t, dtype=torch.bool)
    valid_c[1, t // 2 + 1:] = False  # a completion that ended early
    def view(*shape):
        return torch.randn(*shape, generator=g).transpose(1, 2)
    return (view(b, t, nq, d), view(u, p, nkv, d), view(u, p, nkv, d), view(b, t, nkv, d), view(b, t, nkv, d),
            pidx, valid_p, valid_c, torch.randn(b, t, nq, d, generator=g))


def _check_tf_against(refs, q, kp, vp, kc, vc, pidx, valid_p, valid_c, do, scale, rot=None):
    """tf_attention and its backward against ``refs`` (per dtype: the output and the gradients of q, kp, vp, kc,
    vc under autograd): within 3x the float32 reference's error of the float64 one (and 2e-6). Returns (o, lse)."""
    (u, nkv, p, d) = kp.shape
    o, lse = kernels.tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, scale, rot=rot)
    dq, dk, dv = kernels.tf_attention_backward(q, kp, vp, kc, vc, pidx, valid_p, valid_c, o, lse, do, scale, rot=rot)
    dkp = torch.zeros(u, nkv, p, d).index_add_(0, pidx, dk[:, :, :p])
    dvp = torch.zeros(u, nkv, p, d).index_add_(0, pidx, dv[:, :, :p])
    got = [o, dq.transpose(1, 2), dkp, dvp, dk[:, :, p:], dv[:, :, p:]]
    for name, x, want, torch32 in zip(["o", "dq", "dkp", "dvp", "dkc", "dvc"], got, refs[torch.float64],
                                      refs[torch.float32]):
        err, yard = (x.double() - want).abs().max().item(), (torch32.double() - want).abs().max().item()
        assert err <= max(3 * yard, 2e-6), (name, err, yard)
    return o, lse


@needs_lib
@pytest.mark.parametrize("nq,nkv,d", [(8, 8, 32), (8, 8, 64), (9, 3, 64), (4, 2, 128), (2, 1, 16), (4, 4, 48)])
@pytest.mark.parametrize("t", [1, 8, 13, 40, 150])
def test_tf_attention_forward_and_backward_equal_float64(nq, nkv, d, t):
    """attention.c's teacher-forced attention against the torch expression (the boolean mask the pass gave
    SDPA) in float64 under autograd: output and the gradients of q, the prompt keys/values (summed over
    each prompt's rows) and the completion keys/values, with the float32 torch path's own error as the
    yardstick (at most 3x it, and 2e-6 absolute)."""
    b, u, p = 6, 3, 7
    q, kp, vp, kc, vc, pidx, valid_p, valid_c, do = _tf_inputs(b, u, nq, nkv, t, p, d)
    scale = d ** -0.5
    refs = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, kp, vp, kc, vc)]
        out = kernels.tf_attention_reference(*leaves, pidx, valid_p, valid_c, scale)
        out.backward(do.to(dtype))
        refs[dtype] = [out.detach()] + [x.grad for x in leaves]
    o, lse = _check_tf_against(refs, q, kp, vp, kc, vc, pidx, valid_p, valid_c, do, scale)
    # lse: log of the softmax's normaliser over the keys each query sees
    keys = torch.cat([kp.index_select(0, pidx), kc], 2).repeat_interleave(nq // nkv, 1).double()
    ar = torch.arange(t)
    mask = torch.cat([valid_p.index_select(0, pidx)[:, None, :].expand(b, t, p),
                      (ar[None, :] <= ar[:, None])[None] & valid_c[:, None, :]], -1)[:, None]
    scores = (q.double() @ keys.transpose(-1, -2) * scale).masked_fill(~mask, -torch.inf)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=2e-6, rtol=0)


@needs_lib
@pytest.mark.parametrize("nq,nkv,d", [(8, 8, 32), (9, 3, 64), (4, 4, 48)])
@pytest.mark.parametrize("t", [13, 150])
def test_tf_attention_rotates_queries_and_completion_keys(nq, nkv, d, t):
    """With ``rot``, the kernel takes q and the completion keys unrotated and applies each position's e^{i angle}
    (pairs adjacent) itself: output and lse as the float64 torch expression on rotated inputs, and dq / dk the
    gradients of the unrotated inputs (through the rotation under autograd), within 3x the float32 torch
    path's error (and 2e-6)."""
    b, u, p = 6, 3, 7
    q, kp, vp, kc, vc, pidx, valid_p, valid_c, do = _tf_inputs(b, u, nq, nkv, t, p, d, seed=1)
    g = torch.Generator().manual_seed(2)
    rot = torch.polar(torch.ones(b, t, d // 2), torch.rand(b, t, d // 2, generator=g) * 6)
    scale = d ** -0.5

    def turned(x, r):  # x [B, heads, T, d] times r [B, T, d/2] at every head
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (d // 2, 2))) * r[:, None]).flatten(-2)
    refs = {}
    for dtype, ctype in ((torch.float64, torch.complex128), (torch.float32, torch.complex64)):
        leaves = [x.detach().to(dtype).contiguous().requires_grad_() for x in (q, kp, vp, kc, vc)]
        r = rot.to(ctype)
        out = kernels.tf_attention_reference(turned(leaves[0], r), leaves[1], leaves[2], turned(leaves[3], r),
                                             leaves[4], pidx, valid_p, valid_c, scale)
        out.backward(do.to(dtype))
        refs[dtype] = [out.detach()] + [x.grad for x in leaves]
    _check_tf_against(refs, q, kp, vp, kc, vc, pidx, valid_p, valid_c, do, scale, rot=rot)
    with pytest.raises(ValueError, match="rot must be"):
        kernels.tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, scale, rot=rot[:, :-1])


@needs_lib
@pytest.mark.parametrize("nq,nkv,d", [(8, 8, 32), (4, 2, 64)])
def test_attention_block_equals_the_split_path(nq, nkv, d):
    """tilt.fastforward.AttentionBlock (one autograd node: the rotation, the prompts' SDPA, the completions'
    kernel writing into its rows of the output; the backward writing every gradient once into one buffer
    and un-rotating it in place) against ``attention_by_splits`` (torch ops under autograd, the pass without
    the kernel) in float64: the output and the gradient of the q/k/v product within 3x the float32 split
    path's own error (and 2e-6), with grouped-query heads, padding in a prompt and a completion, rows out of
    prompt order; without a graph (the reference pass) the same output."""
    from tilt.fastforward import AttentionBlock, attention_by_splits

    u, p, t, n = 3, 5, 7, 6
    rows = u * p + n * t
    g = torch.Generator().manual_seed(0)
    y = torch.randn(rows, (nq + 2 * nkv) * d, generator=g)
    ang = torch.rand(rows, 1, d // 2, generator=g) * 6
    rot = torch.polar(torch.ones_like(ang), ang)  # e^{i angle}, complex64
    inverse = torch.tensor([2, 0, 1, 2, 0, 1])
    valid_p = torch.ones(u, p, dtype=torch.bool)
    valid_p[1, :2] = False  # left padding
    valid_c = torch.ones(n, t, dtype=torch.bool)
    valid_c[3, 4:] = False  # right padding
    ar_p, ar_t = torch.arange(p), torch.arange(t)
    mask_p = (((ar_p[None, :] <= ar_p[:, None])[None] & valid_p[:, None, :]) | torch.eye(p, dtype=torch.bool))[:, None]
    mask_c = torch.cat([valid_p.index_select(0, inverse)[:, None, :].expand(n, t, p),
                        (ar_t[None, :] <= ar_t[:, None])[None] & valid_c[:, None, :]], -1)[:, None]
    scale, do = d ** -0.5, torch.randn(rows, nq * d, generator=g)
    refs = {}
    for dtype, ctype in ((torch.float64, torch.complex128), (torch.float32, torch.complex64)):
        leaf = y.to(dtype, copy=True).requires_grad_()
        o = attention_by_splits(leaf, rot.to(ctype), inverse, mask_p, mask_c, u, p, n, t, nq, nkv, d, scale)
        o.backward(do.to(dtype))
        refs[dtype] = (o.detach(), leaf.grad)
    leaf = y.clone().requires_grad_()
    o = AttentionBlock.apply(leaf, rot, inverse, valid_p, valid_c, mask_p, u, p, n, t, nq, nkv, d, scale, True)
    o.backward(do)
    for name, got, want, torch32 in zip(("o", "dy"), (o.detach(), leaf.grad), refs[torch.float64],
                                        refs[torch.float32]):
        err, yard = (got.double() - want).abs().max().item(), (torch32.double() - want).abs().max().item()
        assert err <= max(3 * yard, 2e-6), (name, err, yard)
    with torch.no_grad():
        again = AttentionBlock.apply(y, rot, inverse, valid_p, valid_c, mask_p, u, p, n, t, nq, nkv, d, scale, False)
    torch.testing.assert_close(again, o.detach(), atol=0, rtol=0)


@needs_lib
def test_tf_attention_hand_values():
    """One row, one head, d = 16: a prompt of two keys (the first padding) and two completion keys. Query 0
    sees the valid prompt key and itself; query 1 also its second key, which the padded completion mask
    hides: scores (scale 1) q.k = [., 1, 0, .] for query 0 -> weights softmax([1, 0]) = [e/(e+1), 1/(e+1)]."""
    d = 16
    e0 = torch.zeros(d)
    e0[0] = 1.0
    q = torch.stack([e0, e0])[None, None]  # [1, 1, 2, d]
    kp = torch.stack([e0 * 5, e0])[None, None]  # padding key (would dominate), valid key with score 1
    vp = torch.stack([torch.full((d,), 100.0), torch.full((d,), 2.0)])[None, None]
    kc = torch.stack([torch.zeros(d), e0 * 3])[None, None]
    vc = torch.stack([torch.full((d,), -1.0), torch.full((d,), 50.0)])[None, None]
    valid_p, valid_c = torch.tensor([[False, True]]), torch.tensor([[True, False]])
    o, lse = kernels.tf_attention(q, kp, vp, kc, vc, torch.tensor([0]), valid_p, valid_c, 1.0)
    w = torch.tensor([torch.e, 1.0]) / (torch.e + 1)
    # both queries see the same two keys (key 3 is hidden): (2 e - 1) / (e + 1) = 4.4366 / 3.7183 = 1.19318
    want = float(w[0] * 2.0 + w[1] * -1.0)
    assert abs(want - 1.19318) < 1e-5
    torch.testing.assert_close(o[0, :, 0], torch.full((2, d), want), atol=1e-6, rtol=0)
    torch.testing.assert_close(lse[0, 0], torch.full((2,), float(torch.log(torch.tensor(torch.e + 1)))), atol=1e-6,
                               rtol=0)


@needs_lib
def test_tf_attention_query_that_sees_no_key_gets_zeros():
    """Row 0's prompt is all padding and its completion mask all false, so its queries see no key: output 0,
    lse -inf and no gradient (the torch expression gives NaN there); row 1, of another prompt, is unaffected."""
    q, kp, vp, kc, vc, _, _, _, do = _tf_inputs(2, 2, 2, 2, 3, 4, 16)
    pidx = torch.tensor([0, 1])
    valid_p = torch.tensor([[False] * 4, [True] * 4])
    valid_c = torch.tensor([[False] * 3, [True] * 3])
    o, lse = kernels.tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, 0.25)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and bool(torch.isneginf(lse[0]).all())
    want = kernels.tf_attention_reference(q[1:], kp[1:], vp[1:], kc[1:], vc[1:], torch.tensor([0]), valid_p[1:],
                                          valid_c[1:], 0.25)
    torch.testing.assert_close(o[1:], want, atol=1e-5, rtol=0)
    dq, dk, dv = kernels.tf_attention_backward(q, kp, vp, kc, vc, pidx, valid_p, valid_c, o, lse, do, 0.25)
    assert not dq[0].any() and not dk[0].any() and not dv[0].any()
    assert dq[1].abs().sum() > 0 and dk[1].abs().sum() > 0


@needs_lib
def test_tf_attention_rejects_mismatched_shapes_and_prompt_indices():
    """The C side reads through the pointers unchecked, so the wrapper checks what it relies on."""
    q, kp, vp, kc, vc, pidx, valid_p, valid_c, _ = _tf_inputs(4, 2, 4, 2, 5, 3, 16)
    with pytest.raises(ValueError, match="kc"):
        kernels.tf_attention(q, kp, vp, kc[:, :, :4], vc, pidx, valid_p, valid_c, 0.25)
    with pytest.raises(ValueError, match="prompt index below 2"):
        kernels.tf_attention(q, kp, vp, kc, vc, pidx + 1, valid_p, valid_c, 0.25)
    with pytest.raises(ValueError, match="multiple of the key heads"):
        kernels.tf_attention(q[:, :3], kp, vp, kc, vc, pidx, valid_p, valid_c, 0.25)
    # where the outputs go: a wrong shape, or a layout the kernel cannot write through
    b, nq, t, d = q.shape
    with pytest.raises(ValueError, match="out"):
        kernels.tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, 0.25, out=torch.empty(b, t, nq + 1, d))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, 0.25,
                             out=torch.empty(b, nq, t, d).transpose(1, 2))
    o, lse = kernels.tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, 0.25)
    grads = [torch.empty(b, nq, t, d)] + [torch.empty(b, 2, n, d) for n in (3, t, 3, t)]
    with pytest.raises(ValueError, match="dkp"):  # dkp with one prompt position too many
        kernels.tf_attention_backward(q, kp, vp, kc, vc, pidx, valid_p, valid_c, o, lse, torch.ones_like(o), 0.25,
                                      out=[grads[0], torch.empty(b, 2, 4, d), *grads[2:]])
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kernels.tf_attention_backward(q, kp, vp, kc, vc, pidx, valid_p, valid_c, o, lse, torch.ones_like(o), 0.25,
                                      out=[torch.empty(b, nq, d, t).transpose(-1, -2), *grads[1:]])


@needs_lib
def test_tf_attention_usable_only_where_the_kernel_applies():
    q, kp, vp, kc, vc, *_ = _tf_inputs(2, 1, 2, 2, 3, 4, 16)
    assert kernels.tf_attention_usable(q, kp, vp, kc, vc)
    assert not kernels.tf_attention_usable(q.double(), kp, vp, kc, vc)  # float32 only
    assert not kernels.tf_attention_usable(q[..., :8], kp[..., :8], vp[..., :8], kc[..., :8], vc[..., :8])  # d % 16
    assert not kernels.tf_attention_usable(q.transpose(-1, -2), kp, vp, kc, vc)  # last dimension strided


def _attend_inputs(n, u, nq, nkv, d, p, cap, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, (nq + 2 * nkv) * d, generator=g)
    ang = torch.rand(n, d // 2, generator=g) * 6
    rot = torch.polar(torch.ones_like(ang), ang)
    kc, vc = torch.randn(n, nkv, cap, d, generator=g), torch.randn(n, nkv, cap, d, generator=g)
    kp, vp = torch.randn(u, nkv, p, d, generator=g), torch.randn(u, nkv, p, d, generator=g)
    pad = torch.zeros(u, p, dtype=torch.uint8)
    pad[0, : p // 2] = 1  # left padding on the first prompt
    return y, rot, kc, vc, kp, vp, pad


@needs_lib
@pytest.mark.parametrize("nq,nkv,d", [(8, 8, 32), (8, 8, 64), (9, 3, 64), (4, 2, 128), (2, 1, 16), (4, 4, 48),
                                      (2, 2, 8), (2, 1, 144)])
@pytest.mark.parametrize("t,p", [(0, 7), (5, 7), (11, 7), (37, 19)])
def test_attend_equals_torch_attention(nq, nkv, d, t, p):
    """Head sizes in 16-float vectors (32, 64, 128 fixed; 16, 48 general) and the scalar loop (8, 144),
    grouped-query heads (9 over 3), padding, the first and the last cache position, key counts within one
    block of 16 and over several (19 prompt keys, 38 completion keys): output and cache writes against the
    torch ops, and both against float64."""
    n, u, cap = 12, 3, 12 if t < 12 else 38
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=t)
    ref = [x.clone() for x in (kc, vc)]
    got = kernels.attend(y, rot, kc, vc, kp, vp, pad, t, nq)
    want = kernels.attend_reference(y, rot, *ref, kp, vp, pad, t, nq)
    torch.testing.assert_close(kc, ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(vc, ref[1], atol=0, rtol=0)
    exact = kernels.attend_reference(y.double(), rot.to(torch.complex128), kc.double(), vc.double(), kp.double(),
                                     vp.double(), pad, t, nq)
    err_kernel, err_torch = (got.double() - exact).abs().max(), (want.double() - exact).abs().max()
    assert err_kernel <= max(3 * err_torch, 5e-6), (err_kernel, err_torch)
    # each within a few 1e-6 of float64 (outputs up to ~4), so the two may differ by the sum
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_lib
def test_attend_hand_values():
    """One row, one head, d = 2, two prompt keys of which the second is padding, rotation by 90 degrees
    (e^{i pi/2} = i, so (a, b) -> (-b, a)):
    q = (0, -ln 3) -> (ln 3, 0); new key (1, 0) -> (0, 1), written to the cache; new value (6, 8).
    Scores: prompt key (1, 0): ln 3; padded key: masked; new key (0, 1): 0. Softmax weights 3/4, 1/4:
    output = 3/4 (2, 4) + 1/4 (6, 8) = (3, 5)."""
    import math
    y = torch.tensor([[0.0, -math.log(3.0), 1.0, 0.0, 6.0, 8.0]])  # q | k | v
    rot = torch.tensor([[1j]], dtype=torch.complex64)  # [N, d/2]
    kc, vc = torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    kp = torch.tensor([[[[1.0, 0.0], [5.0, 5.0]]]])  # [U, nkv, P, d]
    vp = torch.tensor([[[[2.0, 4.0], [100.0, 100.0]]]])
    pad = torch.tensor([[0, 1]], dtype=torch.uint8)
    out = kernels.attend(y, rot, kc, vc, kp, vp, pad, 0, 1)
    torch.testing.assert_close(out, torch.tensor([[3.0, 5.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kc[0, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(vc[0, 0, 0], torch.tensor([6.0, 8.0]), atol=0, rtol=0)


@needs_lib
def test_attend_reports_rows_it_could_not_do():
    """When a thread cannot allocate its scratch, ``tilt_attend`` leaves its rows undone (no cache write, no
    output) and returns how many, and the caller raises MemoryError naming it. A position of 2^61 asks for
    a scratch of 2^63 bytes, which no malloc grants; the library is called straight (the wrapper's bound
    check would refuse that position first)."""
    n, u, nq, nkv, d, p, cap = 4, 2, 2, 2, 32, 5, 3
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=0)
    before, out = (kc.clone(), vc.clone()), torch.full((n, nq * d), 7.0)
    lib, ptr = kernels.library(), kernels._ptr
    undone = lib.tilt_attend(ptr(y), ptr(torch.view_as_real(rot)), ptr(kc), ptr(vc), ptr(kp), ptr(vp), ptr(pad),
                             ptr(out), n, u, nq, nkv, d, p, cap, 2 ** 61, 0, None, None)
    assert undone == n
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]) and bool((out == 7.0).all())
    with pytest.raises(MemoryError, match="4 rows left undone"):
        kernels.attend_done(undone)
    kernels.attend_done(0)  # all done: nothing raised


@needs_lib
def test_self_check_raises_on_a_mismatch(monkeypatch):
    """The load-time self-check passes on the built kernels and raises RuntimeError (not an assert,
    which python -O would strip) naming the kernel and head size when the results disagree."""
    kernels._self_check(kernels.library())
    right = kernels.attend_reference
    monkeypatch.setattr(kernels, "attend_reference", lambda *a: right(*a) + 1e-3)  # a wrong torch answer
    with pytest.raises(RuntimeError, match=r"attend \(head size 8\) differs"):
        kernels._self_check(kernels.library())


@needs_lib
def test_attend_rejects_mismatched_shapes():
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(4, 2, 2, 2, 8, 3, 5)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.attend(y, rot, kc, vc, kp.transpose(-1, -2).contiguous(), vp, pad, 0, 2)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attend(y, rot, kc, vc, kp, vp, pad, 5, 2)


@needs_lib
@pytest.mark.parametrize("m,n,k", [(64, 768, 256), (1, 33, 7), (12, 100, 48), (130, 64, 16), (9, 2816, 512)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(m, n, k, bias):
    """linear.c's decode product and its SwiGLU form: full and partial blocks of 8 rows (130 = 16 x 8 + 2,
    9, 1), full and partial panels of 32 (33, 100) and 16 columns, odd K, with and without bias, against
    F.linear in float64 (within a few float32 roundings of each product's size)."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = kernels.linear(x, kernels.pack_linear(w), n, b)
    assert got.shape == (m, n) and (got.double() - exact).abs().max() < 1e-5 * (1 + exact.abs().max())
    if n % 2 == 0:  # the gated MLP's input: silu(first half) * second half
        half = n // 2
        want = F.silu(exact[:, :half]) * exact[:, half:]
        got = kernels.linear_swiglu(x, kernels.pack_linear_swiglu(w), half, b)
        assert got.shape == (m, half) and (got.double() - want).abs().max() < 1e-5 * (1 + want.abs().max())


@needs_lib
def test_linear_rejects_what_it_cannot_read():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    packed = kernels.pack_linear(w)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.linear(x.t().contiguous().t(), packed, 6)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.linear(x.double(), packed, 6)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.linear(torch.randn(4, 9), packed, 6)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.linear_swiglu(x, kernels.pack_linear_swiglu(w), 3, torch.randn(5))


@needs_lib
def test_grouped_decoder_fused_equals_torch_ops(tiny_llama_dir, monkeypatch):
    """Twelve decode steps of 3 prompts x 4 samples (left padding) with the fused kernels called straight
    (``_calls``) in one call a token (``tilt_decode_layers``) and one at a time, through their Python wrappers, and
    with torch ops only: the first three bit-equal (the same kernels), the torch ops' logits to float rounding, the
    same greedy tokens."""
    import tilt.fastdecode as fastdecode
    pol = load_policy(str(tiny_llama_dir))
    ids, mask = encode_prompts(pol.tokenizer, ["47+85=", "cd 3 5 7>22:", "5+4="] * 4)
    u_ids, u_mask, inverse = unique_prompts(ids, mask)
    calls = GroupedDecoder._calls
    runs = []
    for fused, straight, one in ((True, True, True), (True, True, False), (True, False, False), (False, False, False)):
        monkeypatch.setattr(GroupedDecoder, "_calls", calls if straight else lambda self, n: None)
        monkeypatch.setattr(fastdecode, "ONE_CALL", one)
        dec = GroupedDecoder(pol.model, None, u_mask, inverse, 12, positions=ids.shape[1] + 12, fused=fused)
        assert dec.fused == fused
        logits = dec.prefill(u_ids, u_mask).index_select(0, inverse)
        pos, steps = mask.sum(-1), []
        for s in range(12):
            tok = logits.argmax(-1)
            logits = dec.step(tok, pos + s)
            steps.append((tok, logits))
        assert (dec._plan is not None) == straight  # every product packed for tilt.kernels: the straight calls
        runs.append(steps)
    for (tok_a, lg_a), (tok_b, lg_b), (tok_w, lg_w), (tok_c, lg_c) in zip(*runs):
        assert torch.equal(tok_a, tok_b) and torch.equal(lg_a, lg_b)
        assert torch.equal(tok_a, tok_w) and torch.equal(lg_a, lg_w)
        assert torch.equal(tok_a, tok_c)
        torch.testing.assert_close(lg_a, lg_c, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(GroupedDecoder, "_calls", calls)
    monkeypatch.setattr(fastdecode, "ONE_CALL", True)
    dec = GroupedDecoder(pol.model, None, u_mask, inverse, 2, positions=ids.shape[1] + 12)
    logits = dec.prefill(u_ids, u_mask).index_select(0, inverse)
    for s in range(2):
        logits = dec.step(logits.argmax(-1), mask.sum(-1) + s)
    with pytest.raises(ValueError, match="outside the cache"):  # a third token has no room: an error, not a write
        dec.step(logits.argmax(-1), mask.sum(-1) + 2)


@needs_lib
def test_decode_layers_refuses_an_unknown_op_before_running():
    """``tilt_decode_layers`` checks every record before any thread starts: a record of unknown kind after a valid
    norm is refused (ValueError naming the kinds) and the norm's output is not written."""
    lib = kernels.library()
    h, out = torch.ones(2, 16), torch.full((2, 16), 7.0)
    ops = torch.tensor([kernels.decode_op(kernels.DECODE_NORM, None, out.data_ptr(), 2, 16, 1e-5),
                        kernels.decode_op(9)], dtype=torch.int64)
    code = lib.tilt_decode_layers(ops.data_ptr(), ops.shape[0], h.data_ptr(), None, 0)
    with pytest.raises(ValueError, match="unknown kind"):
        kernels.attend_done(code)
    assert torch.equal(out, torch.full((2, 16), 7.0))
    ops = ops[:1].contiguous()  # the norm alone runs
    assert lib.tilt_decode_layers(ops.data_ptr(), 1, h.data_ptr(), None, 0) == 0
    torch.testing.assert_close(out, torch.ones(2, 16))
    with pytest.raises(ValueError, match="entries for a record"):
        kernels.decode_op(kernels.DECODE_ATTEND, *range(18))


def _status_in_subprocess(env: dict) -> tuple[str, str]:
    """(stdout, stderr) of a process printing ``kernels.status()`` and whether the kernels are usable."""
    code = ("import tilt.kernels as k, tilt.fastdecode as f; print(k.status()); "
            "print(k.usable(__import__('torch').zeros(1)))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


@needs_lib
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_kernels_load_when_first_used_without_grad(context):
    """Sampling (under no_grad or inference_mode) is often the first use; the self-check's backward
    still runs there, so the kernels load."""
    code = (f"import torch\nwith torch.{context}():\n    import tilt.kernels as k\n    print(k.status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded", out.stdout + out.stderr


def test_disabled_or_unbuildable_kernels_keep_torch_ops(tmp_path):
    """TILT_KERNELS=0 and a compiler that fails both leave the decoder on torch ops, with the cause in
    ``status()``; a failed build leaves no file behind in the cache directory."""
    out, err = _status_in_subprocess({"TILT_KERNELS": "0", "TILT_CACHE_DIR": str(tmp_path)})
    assert out.split("\n")[:2] == ["disabled by TILT_KERNELS", "False"] and "tilt.kernels" not in err
    out, err = _status_in_subprocess({"CC": "false", "TILT_CACHE_DIR": str(tmp_path)})
    assert out.startswith("unavailable: RuntimeError") and "false failed" in out and "\nFalse" in out
    assert "RuntimeWarning: tilt.kernels: the fused kernels are unavailable" in err
    assert not list((tmp_path / "kernels").glob("*"))


@needs_lib
def test_build_goes_to_the_cache_directory(tmp_path):
    """A build lands in $TILT_CACHE_DIR/kernels under a name keyed by source, compiler and CPU, with no
    temporary file left; a second process loads it without building."""
    out, _ = _status_in_subprocess({"TILT_CACHE_DIR": str(tmp_path)})
    assert out.split("\n")[:2] == ["loaded", "True"]
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert _status_in_subprocess({"TILT_CACHE_DIR": str(tmp_path)})[0].startswith("loaded")
    assert built[0].stat().st_mtime_ns == stamp


def _check_inverse_cdf(tok, logp, logits, u, temperature, ban):
    """``kernels.sample_rows_agrees`` (exact inverse-CDF draw up to 1e-6 of mass, never the banned token,
    float64 log-probs to 1e-5) as an assertion; returns how many tokens equal the exact draw."""
    assert kernels.sample_rows_agrees(tok, logp, logits, u, temperature, ban)
    p = torch.softmax(logits.double() / temperature, -1)
    if ban is not None:
        p[:, ban] = 0.0
    cdf = p.cumsum(-1) / p.sum(-1, keepdim=True)
    exact = torch.searchsorted(cdf, u.double().reshape(-1, 1), right=True).squeeze(-1)
    return int((tok == exact).sum())


@pytest.mark.parametrize("v", [1024, 5000, 49152])
def test_sample_rows_is_the_inverse_cdf_draw(v):
    """The C sampler (speed work 33) draws, for each row's u, the token whose cumulative probability
    first exceeds u (float64 reference, up to 1e-6 of mass: float rounding at boundaries), never the
    banned token, with the float64 log-softmax's log-prob (the banned token's mass included), at several
    temperatures, with and without a ban, on peaked and flat rows; and nearly always exactly the
    reference's token."""
    g = torch.Generator().manual_seed(v)
    same = total = 0
    for scale, temperature, ban in ((1.0, 1.0, None), (4.0, 0.7, 2), (8.0, 1.3, v - 1), (0.1, 1.0, 0)):
        logits = torch.randn(64, v, generator=g) * scale
        u = torch.rand(64, generator=g)
        out = kernels.sample_rows(logits, u, temperature, ban)
        assert out is not None
        same += _check_inverse_cdf(*out, logits, u, temperature, ban)
        total += 64
        moved = (out[0] + 7) % v
        moved = torch.where(moved == (-1 if ban is None else ban), (moved + 1) % v, moved)  # the check can fail
        assert not kernels.sample_rows_agrees(moved, out[1], logits, u, temperature, ban)
    assert same >= total - 2


def test_sample_rows_hand_values():
    """Four tokens with logits ln 1, ln 2, ln 3, ln 4: probabilities 0.1, 0.2, 0.3, 0.4, cumulative 0.1,
    0.3, 0.6, 1.0. u = 0.25 -> token 1 (0.1 <= 0.25 < 0.3), log-prob ln 0.2. Token 3 banned: the rest
    renormalised 1/6, 1/2, 1 (0.1, 0.3, 0.6 over 0.6); u = 0.6 -> token 2, log-prob ln 0.3 (the ban keeps
    its mass in the normaliser). Temperature 0.5: weights k^2 = 1, 4, 9, 16 over 30, cumulative 1/30,
    5/30, 14/30, 1; u = 0.5 -> token 3, log-prob ln(16/30)."""
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    cases = ((0.25, 1.0, None, 1, 0.2), (0.6, 1.0, 3, 2, 0.3), (0.5, 0.5, None, 3, 16 / 30))
    for u, temperature, ban, want_tok, want_p in cases:
        tok, logp = kernels.sample_rows(logits, torch.tensor([u]), temperature, ban)
        assert int(tok[0]) == want_tok
        assert abs(float(logp[0]) - torch.log(torch.tensor(want_p, dtype=torch.float64)).item()) < 1e-6


def test_sample_rows_with_a_dominant_banned_token_and_edge_draws():
    """A banned token far above the rest (EOS before the minimum length): the weights are taken relative
    to the drawable tokens, so a ban 200 nats up still draws by the rest's probabilities and reports
    log-probs near -200 (the torch path's probabilities all underflow there). u = 0 takes the first token
    with weight, u just below 1 the last one (tokens at -inf have none). NaN or infinite rows: None."""
    v = 2048
    logits = torch.zeros(4, v)
    logits[:, 5] = 200.0  # the banned token
    logits[:, -3:] = -torch.inf  # no weight
    logits[:, :2] = -torch.inf
    u = torch.tensor([0.0, 0.5, 1.0 - 2.0 ** -24, 0.25])
    tok, logp = kernels.sample_rows(logits, u, 1.0, 5)
    assert tok[0] == 2 and tok[2] == v - 4 and not bool((tok == 5).any())
    assert abs(int(tok[1]) - v // 2) <= 2 and abs(int(tok[3]) - v // 4) <= 2
    want = -200.0 - torch.log1p(torch.tensor((v - 6) * torch.e ** -200.0, dtype=torch.float64))
    torch.testing.assert_close(logp.double(), want.expand(4), atol=1e-4, rtol=0)
    for bad in (torch.nan, torch.inf):
        row = torch.zeros(2, v)
        row[1, 7] = bad
        assert kernels.sample_rows(row, torch.full((2,), 0.5), 1.0, None) is None


def test_pick_with_the_c_sampler_equals_the_torch_path(monkeypatch):
    """tilt.rollout._pick through the C sampler and through torch ops (``rollout.C_SAMPLING``), from the
    same seed: the same generator draws (its state after both is equal), tokens equal except at
    float-rounding boundaries (both within 1e-6 of mass of the exact draw), log-probs equal to 1e-5 where
    the tokens agree. A row the kernel declines (NaN) goes to the torch path with the draw already taken:
    the same tokens and generator state as the torch path alone."""
    import tilt.rollout as rollout

    calls = []
    orig = kernels.sample_rows
    monkeypatch.setattr(kernels, "sample_rows", lambda *a, **k: calls.append(1) or orig(*a, **k))

    def pick(logits, params, seed, ban, c_sampling):
        monkeypatch.setattr(rollout, "C_SAMPLING", c_sampling)
        gen = torch.Generator().manual_seed(seed)
        tok, logp = rollout._pick(logits, params, gen, ban)
        return tok, logp, gen.get_state()

    g = torch.Generator().manual_seed(3)
    same = total = 0
    for v, temperature, ban in ((1024, 1.0, None), (6000, 0.8, 1), (49152, 1.0, 2)):
        logits = torch.randn(64, v, generator=g) * 3
        params = rollout.SamplingParams(max_new_tokens=1, temperature=temperature)
        t1, l1, s1 = pick(logits, params, v, ban, True)
        t2, l2, s2 = pick(logits, params, v, ban, False)
        assert torch.equal(s1, s2)
        u = torch.rand((64, 1), generator=torch.Generator().manual_seed(v)).squeeze(-1)
        _check_inverse_cdf(t1, l1, logits, u, temperature, ban)
        _check_inverse_cdf(t2, l2, logits, u, temperature, ban)
        eq = t1 == t2
        torch.testing.assert_close(l1[eq], l2[eq], atol=1e-5, rtol=0)
        same += int(eq.sum())
        total += 64
    assert len(calls) == 3 and same >= total - 2
    logits = torch.randn(4, 2048, generator=g)
    logits[2, 9] = torch.nan
    params = rollout.SamplingParams(max_new_tokens=1)
    t1, _, s1 = pick(logits, params, 0, None, True)
    t2, _, s2 = pick(logits, params, 0, None, False)
    assert len(calls) == 4 and torch.equal(t1, t2) and torch.equal(s1, s2)
