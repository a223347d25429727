"""Fused float32 CPU kernels for the decode step and its large-vocabulary sampler (``decode.c``), its
products (``linear.c``), and for
the teacher-forced pass's norms and SwiGLU (``forward.c``) and its completions' attention
(``attention.c``), forward and backward, built on first use with the system C compiler into one library
and loaded through ctypes.

Why C and not torch ops: at 64 rows and 10M-30M parameters the decode step's attention is ~15 torch
operations per layer whose dispatch and memory traffic cost more than their arithmetic (about 1.1 ms of
which 0.2-0.3 ms is the two products, 10M x 64 tokens; benchmarks/README.md, "Ninth session"), and the
norms and SwiGLU add a few more each. ``torch.compile`` would fuse them, but its first compile takes
minutes on a 2-core machine (speed work 29); a plain C file compiles in about a second.

The library is built once per source, compiler and CPU (it is compiled for the host's instruction set,
``-march=native``) into ``$TILT_CACHE_DIR/kernels`` (default ``~/.cache/tilt/kernels``), written to a
temporary name and renamed into place, so concurrent processes never load a half-written file. Before
first use each kernel is checked against the torch expression it replaces on fixed inputs. When there
is no compiler, the build fails, the check fails, or ``TILT_KERNELS=0`` is set, ``library()`` returns
None and the decoder and the pass keep their torch ops (same results to float rounding); ``status()`` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).parent
SOURCES = [HERE / "decode.c", HERE / "forward.c", HERE / "attention.c", HERE / "linear.c"]  # one library
HEADERS = [HERE / "common.h", HERE / "vec16.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "tilt_attend": [_P] * 8 + [_I64] * 9 + [_P, _P],
    "tilt_kv_half": [],
    "tilt_add_rms_norm": [_P, _P, _P, _I64, _I64, _F32],
    "tilt_silu_mul": [_P, _P, _I64, _I64],
    "tilt_silu_mul_gate": [_P, _I64, _I64],
    "tilt_expv": [_P, _P, _I64],
    "tilt_expv_explicit": [],
    "tilt_swiglu_backward": [_P, _P, _P, _I64, _I64],
    "tilt_rms_norm_forward": [_P, _P, _P, _P, _I64, _I64, _F32],
    "tilt_rms_norm_backward": [_P] * 6 + [_I64, _I64],
    "tilt_sample_rows": [_P, _P, _I64, _I64, _F32, _I64, _P, _P],
    "tilt_tf_attention_forward": [_P] * 12 + [_I64] * 6 + [_F32],
    "tilt_tf_attention_backward": [_P] * 19 + [_I64] * 6 + [_F32],
    "tilt_pack_linear": [_P, _P, _I64, _I64],
    "tilt_linear": [_P] * 4 + [_I64] * 3,
    "tilt_pack_linear_swiglu": [_P, _P, _I64, _I64],
    "tilt_linear_swiglu": [_P] * 4 + [_I64] * 3,
    "tilt_decode_layers": [_P, _I64, _P, _P, _I64],
}
RETURNS = {"tilt_sample_rows": ctypes.c_int, "tilt_tf_attention_forward": ctypes.c_int,
           "tilt_tf_attention_backward": ctypes.c_int, "tilt_attend": ctypes.c_int,
           "tilt_kv_half": ctypes.c_int, "tilt_decode_layers": ctypes.c_int,
           "tilt_expv_explicit": ctypes.c_int}  # the others return nothing
_state: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("TILT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "tilt")
    return Path(root) / "kernels"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [*(f.read_text() for f in SOURCES + HEADERS), cc, version, " ".join(FLAGS), platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: another process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, RETURNS.get(name)
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None where they cannot be used (``status()`` says why). Once per process."""
    if "lib" not in _state:
        _state["lib"], _state["status"] = None, "not built"
        if os.environ.get("TILT_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            _state["status"] = "disabled by TILT_KERNELS"
        elif not sys.platform.startswith("linux"):
            _state["status"] = f"not built on {sys.platform} (Linux only)"
        elif (cc := _compiler()) is None:
            _state["status"] = "no C compiler found (set CC)"
        else:
            try:
                lib = _load(_build(cc))
                with torch.inference_mode(False), torch.enable_grad():  # first use is often under no_grad
                    _self_check(lib)
                _state["lib"], _state["status"] = lib, "loaded"
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                _state["status"] = f"unavailable: {type(e).__name__}: {e}"
                # a compiler is there but the build or its check failed: say so once (no compiler is quiet)
                warnings.warn(f"tilt.kernels: the fused kernels are {_state['status']}; sampling and the "
                              f"teacher-forced pass use torch ops (same results, slower). TILT_KERNELS=0 skips the "
                              f"build.", RuntimeWarning,
                              stacklevel=2)
    return _state["lib"]


def status() -> str:
    library()
    return _state["status"]


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can run on these tensors: loaded, float32, CPU, contiguous."""
    return library() is not None and all(
        x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() for x in tensors)


def _ptr(x: Optional[Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


LINEAR_PANEL = 32  # output columns per panel of ``pack_linear``'s layout


def pack_linear(w: Tensor, lib=None) -> Tensor:
    """``linear.c``'s layout of a float32 weight ``w`` [N, K] (``nn.Linear``'s): panels of 32 output columns,
    k-major, zero past N; a flat tensor of ceil(N / 32) * 32 * K floats. Packed once, used by ``linear``
    for any row count."""
    lib = lib or library()
    n, k = w.shape
    w = w.detach().contiguous()
    out = w.new_empty(-(-n // LINEAR_PANEL) * LINEAR_PANEL * k)
    lib.tilt_pack_linear(_ptr(w), _ptr(out), n, k)
    return out


def linear(x: Tensor, packed: Tensor, n: int, b: Optional[Tensor] = None, lib=None) -> Tensor:
    """``F.linear(x, w, b)`` for x [M, K] float32 contiguous, with ``packed = pack_linear(w)`` (w [n, K]):
    ``linear.c``'s decode-step product (summed in k order, one fused multiply-add chain per output)."""
    lib = lib or library()
    m, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"linear: x must be contiguous float32, got {x.dtype} with strides {x.stride()}")
    if packed.numel() != -(-n // LINEAR_PANEL) * LINEAR_PANEL * k or (b is not None and b.numel() != n):
        raise ValueError(f"linear: packed weight of {packed.numel()} floats (bias {None if b is None else b.numel()}) "
                         f"does not fit [{m}, {k}] x [{k}, {n}]")
    out = x.new_empty(m, n)
    lib.tilt_linear(_ptr(x), _ptr(packed), _ptr(b), _ptr(out), m, n, k)
    return out


def pack_linear_swiglu(w: Tensor, lib=None) -> Tensor:
    """``linear.c``'s layout of a gated MLP's float32 gate/up weight ``w`` [2 I, K] (gate rows, then up rows):
    panels of 16 gate columns and their 16 up columns, k-major, zero past I; ceil(I / 16) * 32 * K floats."""
    lib = lib or library()
    n, k = w.shape
    w = w.detach().contiguous()
    out = w.new_empty(-(-(n // 2) // 16) * LINEAR_PANEL * k)
    lib.tilt_pack_linear_swiglu(_ptr(w), _ptr(out), n // 2, k)
    return out


def linear_swiglu(x: Tensor, packed: Tensor, inter: int, b: Optional[Tensor] = None, lib=None) -> Tensor:
    """``silu(g) * u`` where ``[g, u] = F.linear(x, w, b)`` splits at ``inter`` (the SiLU-gated MLP's input),
    with ``packed = pack_linear_swiglu(w)``: one pass of ``linear.c``, no [M, 2 inter] product written."""
    lib = lib or library()
    m, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"linear_swiglu: x must be contiguous float32, got {x.dtype} with strides {x.stride()}")
    if packed.numel() != -(-inter // 16) * LINEAR_PANEL * k or (b is not None and b.numel() != 2 * inter):
        raise ValueError(f"linear_swiglu: packed weight of {packed.numel()} floats (bias "
                         f"{None if b is None else b.numel()}) does not fit [{m}, {k}] x [{k}, 2 x {inter}]")
    out = x.new_empty(m, inter)
    lib.tilt_linear_swiglu(_ptr(x), _ptr(packed), _ptr(b), _ptr(out), m, inter, k)
    return out


def add_rms_norm(h: Tensor, x: Optional[Tensor], eps: float, lib=None) -> Tensor:
    """``h += x`` in place (when ``x`` is given), then h's RMS norm without weight, [N, H] -> [N, H]."""
    lib = lib or library()
    n, width = h.shape
    out = torch.empty_like(h)
    lib.tilt_add_rms_norm(_ptr(h), _ptr(x), _ptr(out), n, width, eps)
    return out


def silu_mul(gu: Tensor, lib=None) -> Tensor:
    """silu(gu[:, :I]) * gu[:, I:] for gu [N, 2I] -> [N, I]."""
    lib = lib or library()
    n, width = gu.shape
    out = gu.new_empty(n, width // 2)
    lib.tilt_silu_mul(_ptr(gu), _ptr(out), n, width // 2)
    return out


def silu_mul_gate(gu: Tensor, lib=None) -> Tensor:
    """``silu_mul(gu)`` written into gu's gate half (gu [N, 2I] contiguous, overwritten there); returns that half,
    the view ``gu[:, :I]`` (rows 2I floats apart). For a pass without autograd, where gu is not read again."""
    lib = lib or library()
    n, width = gu.shape
    if not gu.is_contiguous() or gu.dtype != torch.float32:
        raise ValueError(f"silu_mul_gate: gu must be contiguous float32, got {gu.dtype} with strides {gu.stride()}")
    lib.tilt_silu_mul_gate(_ptr(gu), n, width // 2)
    return gu[:, :width // 2]


def expv(x: Tensor, lib=None) -> Tensor:
    """The kernels' 16-lane exp (vec16.h's ``expv``) of float32 ``x`` (any shape; padded to a multiple of 16 inside):
    x = n ln2 + r, exp(r) by Cephes' expf polynomial, times 2^n, arguments clamped to [-87, 88]; within one float ulp
    of exp there. For tests of the exp every fused softmax and SiLU uses."""
    lib = lib or library()
    flat = x.detach().to(torch.float32).reshape(-1)
    n = flat.numel()
    padded = torch.zeros((n + 15) // 16 * 16, dtype=torch.float32)
    padded[:n] = flat
    out = torch.empty_like(padded)
    lib.tilt_expv(_ptr(padded), _ptr(out), padded.numel())
    return out[:n].reshape(x.shape)


def swiglu_backward(gu: Tensor, dy: Tensor, lib=None, into: bool = False) -> Tensor:
    """The gradient of ``silu_mul`` at ``gu`` [N, 2I] for ``dy`` [N, I]: [N, 2I] (gate half, up half); ``into``:
    written over gu itself (each element's inputs are read before its place is written) and returned."""
    lib = lib or library()
    n, width = gu.shape
    if dy.shape != (n, width // 2):
        raise ValueError(f"swiglu_backward: dy {tuple(dy.shape)} does not match gu {tuple(gu.shape)}")
    out = gu if into else torch.empty_like(gu)
    lib.tilt_swiglu_backward(_ptr(gu), _ptr(dy), _ptr(out), n, width // 2)
    return out


def rms_norm_forward(x: Tensor, w: Optional[Tensor], eps: float, lib=None) -> tuple[Tensor, Tensor]:
    """RMS norm of ``x`` [N, H] times ``w`` [H] (or no weight): (y [N, H], r [N] = 1/rms per row)."""
    lib = lib or library()
    n, width = x.shape
    y, r = torch.empty_like(x), x.new_empty(n)
    lib.tilt_rms_norm_forward(_ptr(x), _ptr(w), _ptr(y), _ptr(r), n, width, eps)
    return y, r


def rms_norm_backward(x: Tensor, w: Optional[Tensor], r: Tensor, dy: Tensor, need_x: bool = True,
                      need_w: bool = True, lib=None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of ``rms_norm_forward`` with respect to x [N, H] and w [H] for ``dy`` [N, H]
    (None where not asked for, and dw always None without a weight)."""
    lib = lib or library()
    n, width = x.shape
    dx = torch.empty_like(x) if need_x else None
    dw = x.new_empty(width) if need_w and w is not None else None
    lib.tilt_rms_norm_backward(_ptr(x), _ptr(w), _ptr(r), _ptr(dy), _ptr(dx), _ptr(dw), n, width)
    return dx, dw


def tf_attention_usable(q: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor) -> bool:
    """Whether ``tf_attention`` can take these: loaded, float32 CPU tensors with a contiguous last
    dimension, and a head size that is a multiple of 16 (the kernel's vector width)."""
    return library() is not None and q.shape[-1] % 16 == 0 and all(
        x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(-1) == 1 for x in (q, kp, vp, kc, vc))


def _tf_args(q, kp, vp, kc, vc, pidx, valid_p, valid_c, rot):
    """The kernel's pointer arguments after checking the shapes it relies on (the C side reads through
    them unchecked); also the tensors those pointers point into, to keep alive until the call returns."""
    (b, nq, t, d), (u, nkv, p) = q.shape, kp.shape[:3]
    if rot is not None and (tuple(rot.shape) != (b, t, d // 2) or rot.dtype != torch.complex64
                            or not rot.is_contiguous()):
        raise ValueError(f"tf_attention: rot must be a contiguous complex64 tensor of shape {(b, t, d // 2)} (each "
                         f"position's e^{{i angle}}); got {tuple(rot.shape)} {rot.dtype}")
    want = {"kp": (u, nkv, p, d), "vp": (u, nkv, p, d), "kc": (b, nkv, t, d), "vc": (b, nkv, t, d), "pidx": (b,),
            "valid_p": (u, p), "valid_c": (b, t)}
    got = {"kp": kp, "vp": vp, "kc": kc, "vc": vc, "pidx": pidx, "valid_p": valid_p, "valid_c": valid_c}
    bad = [f"{k} {tuple(got[k].shape)} (want {w})" for k, w in want.items() if tuple(got[k].shape) != w]
    if nq % nkv or bad or (b and not 0 <= int(pidx.min()) <= int(pidx.max()) < u):
        raise ValueError(f"tf_attention: q {tuple(q.shape)} with {', '.join(bad) or 'those shapes'}; the query heads "
                         f"must be a multiple of the key heads and every pidx a prompt index below {u}")
    strides = torch.tensor([st for x in (q, kp, vp, kc, vc) for st in x.stride()[:3]], dtype=torch.int64)
    keep = (strides, pidx.to(torch.int64).contiguous(), valid_p.to(torch.uint8).contiguous(),
            valid_c.to(torch.uint8).contiguous(), None if rot is None else torch.view_as_real(rot))
    return keep, [_ptr(x) for x in (q, kp, vp, kc, vc, *keep)]


def tf_attention(q: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor, pidx: Tensor, valid_p: Tensor,
                 valid_c: Tensor, scale: float, lib=None, out: Optional[Tensor] = None,
                 rot: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``attention.c``'s teacher-forced attention: row b's queries ``q`` [B, nq, T, d] over the keys/values
    of its prompt ``pidx[b]`` (``kp``/``vp`` [U, nkv, P, d], where ``valid_p`` [U, P] is true) and, causally,
    its own (``kc``/``vc`` [B, nkv, T, d], where ``valid_c`` [B, T] is true). Any strides with the last
    dimension contiguous (``tf_attention_usable``). Returns (o [B, T, nq, d] contiguous, lse [B, nq, T]);
    ``out``: a contiguous [B, T, nq, d] tensor to write o into (a slice of a larger buffer, say). ``rot``: each
    completion position's rotary embedding e^{i angle}, complex64 [B, T, d/2] (pairs adjacent): q and kc are then
    the unrotated projections, rotated inside the kernel (kp comes rotated); the same as passing q and kc
    multiplied by it."""
    lib = lib or library()
    (b, nq, t, d), (nkv, p) = q.shape, kp.shape[1:3]
    if out is None:
        out = q.new_empty(b, t, nq, d)
    elif tuple(out.shape) != (b, t, nq, d) or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError(f"tf_attention: out {tuple(out.shape)} {out.dtype} must be a contiguous {q.dtype} tensor "
                         f"of shape {(b, t, nq, d)}")
    lse = q.new_empty(b, nq, t)
    keep, ptrs = _tf_args(q, kp, vp, kc, vc, pidx, valid_p, valid_c, rot)
    if lib.tilt_tf_attention_forward(*ptrs, _ptr(out), _ptr(lse), b, nq, nkv, t, p, d, float(scale)):
        raise MemoryError("tf_attention: the kernel could not allocate its per-thread buffers")
    return out, lse


def tf_attention_backward(q: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor, pidx: Tensor,
                          valid_p: Tensor, valid_c: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float,
                          lib=None, out: Optional[tuple[Tensor, ...]] = None,
                          rot: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """The gradients of ``tf_attention`` for ``do`` [B, T, nq, d]: (dq [B, T, nq, d], dk, dv [B, nkv, P + T, d]),
    the prompt part of dk/dv per row (sum it over each prompt's rows). ``out``: where to write them instead,
    (dq [B, nq, T, d], dkp [B, nkv, P, d], dkc [B, nkv, T, d], dvp, dvc), any strides with the last dimension
    contiguous (slices of one gradient buffer, say); returned as given. ``rot``: as the forward's; dq and the
    completion part of dk are then the gradients of the unrotated q and kc."""
    lib = lib or library()
    (b, nq, t, d), (nkv, p) = q.shape, kp.shape[1:3]
    do = do.contiguous()
    if out is None:
        dq, dk, dv = q.new_empty(b, t, nq, d), q.new_empty(b, nkv, p + t, d), q.new_empty(b, nkv, p + t, d)
        parts, result = (dq.transpose(1, 2), dk[:, :, :p], dk[:, :, p:], dv[:, :, :p], dv[:, :, p:]), (dq, dk, dv)
    else:
        parts = result = tuple(out)
        want = [(b, nq, t, d), (b, nkv, p, d), (b, nkv, t, d), (b, nkv, p, d), (b, nkv, t, d)]
        if len(parts) != 5 or any(tuple(x.shape) != w or x.stride(-1) != 1 or x.dtype != q.dtype
                                  for x, w in zip(parts, want)):
            raise ValueError(f"tf_attention_backward: out must be (dq, dkp, dkc, dvp, dvc) of shapes {want}, "
                             f"{q.dtype} with a contiguous last dimension; got "
                             f"{[(tuple(x.shape), x.stride(-1), x.dtype) for x in parts]}")
    ost = torch.tensor([st for x in parts for st in x.stride()[:3]], dtype=torch.int64)
    keep, ptrs = _tf_args(q, kp, vp, kc, vc, pidx, valid_p, valid_c, rot)
    if lib.tilt_tf_attention_backward(*ptrs, _ptr(o), _ptr(lse), _ptr(do), *(_ptr(x) for x in parts), _ptr(ost), b,
                                      nq, nkv, t, p, d, float(scale)):
        raise MemoryError("tf_attention_backward: the kernel could not allocate its per-thread buffers")
    return result


def tf_attention_reference(q: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor, pidx: Tensor,
                           valid_p: Tensor, valid_c: Tensor, scale: float) -> Tensor:
    """``tf_attention``'s output in torch ops (the mask the teacher-forced pass gave SDPA), [B, T, nq, d]."""
    (b, nq, t, d), nkv, p = q.shape, kp.shape[1], kp.shape[2]
    keys = torch.cat([kp.index_select(0, pidx), kc], 2).repeat_interleave(nq // nkv, 1)
    values = torch.cat([vp.index_select(0, pidx), vc], 2).repeat_interleave(nq // nkv, 1)
    ar = torch.arange(t)
    mask = torch.cat([valid_p.bool().index_select(0, pidx)[:, None, :].expand(b, t, p),
                      (ar[None, :] <= ar[:, None])[None] & valid_c.bool()[:, None, :]], -1)[:, None]
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    w = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1)
    return torch.matmul(w, values).transpose(1, 2)


def sample_rows(logits: Tensor, u: Tensor, temperature: float, ban: Optional[int],
                lib=None) -> Optional[tuple[Tensor, Tensor]]:
    """``decode.c``'s ``tilt_sample_rows``: one token per row of ``logits`` [N, V] drawn by inverse transform
    sampling from softmax(logits / temperature) with the uniform draws ``u`` [N] (or [N, 1]), token ``ban``
    (or None) never drawn but kept in the normaliser; (tokens [N] int64, their log-probs [N]). None when a
    row has no finite, positive weight (NaN or infinite logits): the caller's torch path decides then."""
    lib = lib or library()
    n, v = logits.shape
    u = u.reshape(-1).contiguous()
    if u.shape[0] != n or u.dtype != torch.float32 or not temperature > 0:
        raise ValueError(f"sample_rows: {u.shape[0]} {u.dtype} draws for {n} rows, temperature {temperature}")
    tok, logp = torch.empty(n, dtype=torch.int64), logits.new_empty(n)
    bad = lib.tilt_sample_rows(_ptr(logits), _ptr(u), n, v, float(temperature), -1 if ban is None else int(ban),
                               _ptr(tok), _ptr(logp))
    return None if bad else (tok, logp)


def sample_rows_agrees(tok: Tensor, logp: Tensor, logits: Tensor, u: Tensor, temperature: float,
                       ban: Optional[int], slack: float = 1e-6) -> bool:
    """Whether ``sample_rows``' tokens are the exact inverse-CDF draws for ``u`` (float64: the first token
    whose cumulative probability, the banned token's removed and the rest renormalised, exceeds u) up to
    ``slack`` of probability mass, and its log-probs the float64 log-softmax's to 1e-5."""
    logp64 = torch.log_softmax(logits.double() / temperature, -1)
    p = logp64.exp()
    if ban is not None:
        p[:, ban] = 0.0
    cdf = p.cumsum(-1) / p.sum(-1, keepdim=True)
    u, rows = u.reshape(-1).double(), torch.arange(tok.shape[0])
    if bool(((tok < 0) | (tok >= logits.shape[1])).any()) or (ban is not None and bool((tok == ban).any())):
        return False
    before = torch.where(tok > 0, cdf[rows, (tok - 1).clamp(min=0)], torch.zeros_like(u))
    return (bool((cdf[rows, tok] > u - slack).all()) and bool((before <= u + slack).all())
            and torch.allclose(logp.double(), logp64[rows, tok], atol=1e-5, rtol=1e-6))


def attend(y: Tensor, rot: Tensor, kc: Tensor, vc: Tensor, kp: Tensor, vp: Tensor, pad: Tensor, t: int,
           nq: int, lib=None, ks: Optional[Tensor] = None, vs: Optional[Tensor] = None) -> Tensor:
    """``decode.c``'s ``tilt_attend``: rotary embedding of the new query and key in ``y`` (the fused
    q/k/v product, [N, (nq + 2 nkv) d], rows in prompt order), the new key and value written to
    ``kc``/``vc`` [N, nkv, cap, d] at position ``t``, and attention over the prompt's keys ``kp``
    and values ``vp`` [U, nkv, P, d] (``pad`` [U, P] uint8, 1 = padding) and the
    completion's 0..t. ``rot``: [N, d/2] complex64. ``kc``/``vc`` may be float16 (rollout.kv_cache_dtype;
    where ``kv_half_usable``): the new key and value are rounded to it as torch's ``.half()`` rounds; or int8
    with their scales in ``ks``/``vs`` [N, nkv, cap] float32 (where ``kv_int8_usable``): each new key and value
    kept as ``quantize_int8`` keeps it. Returns [N, nq d]."""
    lib = lib or library()
    n, nkv, cap, d = kc.shape
    u, p = pad.shape
    if kp.shape != (u, nkv, p, d) or vp.shape != (u, nkv, p, d) or y.shape != (n, (nq + 2 * nkv) * d):
        raise ValueError(f"attend: shapes do not match: y {tuple(y.shape)}, kc {tuple(kc.shape)}, "
                         f"kp {tuple(kp.shape)}, vp {tuple(vp.shape)}, pad {tuple(pad.shape)}")
    if not 0 <= t < cap or n % u:
        raise ValueError(f"attend: position {t} outside the cache's {cap}, or {n} rows not in groups of {u}")
    if kc.dtype != vc.dtype or kc.dtype not in (torch.float32, torch.float16, torch.int8) or not (
            kc.is_contiguous() and vc.is_contiguous()):
        raise ValueError(f"attend: the completion cache must be contiguous float32, float16 or int8 (keys {kc.dtype}, "
                         f"values {vc.dtype})")
    scaled = kc.dtype == torch.int8
    if scaled and not all(x is not None and x.dtype == torch.float32 and x.is_contiguous() and x.shape == (n, nkv, cap)
                          for x in (ks, vs)):
        raise ValueError(f"attend: an int8 cache needs its scales ks, vs as contiguous float32 [{n}, {nkv}, {cap}]")
    out = y.new_empty(n, nq * d)
    kind = 2 if scaled else int(kc.dtype == torch.float16)
    attend_done(lib.tilt_attend(_ptr(y), _ptr(torch.view_as_real(rot)), _ptr(kc), _ptr(vc), _ptr(kp), _ptr(vp),
                                _ptr(pad), _ptr(out), n, u, nq, nkv, d, p, cap, t, kind,
                                _ptr(ks) if scaled else None, _ptr(vs) if scaled else None))
    return out


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each vector along the last dimension of float32 ``x`` [..., d] as 8-bit integers and one scale: (round(x 127 /
    m) as int8 [..., d], m / 127 [...]) with m = max |x| over the vector (ties to even; zeros and scale 0 where m = 0).
    Dequantized, values are within half a step, m / 254, of x (absmax quantization; LLM.int8(), arXiv:2208.07339,
    Eq. 1, per vector). What ``tilt_attend`` keeps in an int8 cache, in the same float32 steps."""
    m = x.abs().amax(-1)  # [...]
    inv = torch.where(m > 0, 127.0 / m, torch.zeros_like(m))
    return torch.round(x * inv[..., None]).to(torch.int8), m / 127.0


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``quantize_int8``'s vectors back as ``dtype``: q scale."""
    return q.to(dtype) * scale.to(dtype)[..., None]


KV_RANGE, KV_UNSUPPORTED = -1, -2  # decode.c's TILT_KV_RANGE, TILT_KV_UNSUPPORTED


def attend_done(code: int) -> None:
    """Raise for what ``tilt_attend`` (or ``tilt_decode_layers``) reports: rows left undone (a thread could not
    allocate its scratch: MemoryError), a new key or value beyond float16's range in a float16 cache
    (OverflowError), a float16 cache where the build or head size has none, an op of unknown kind (ValueError)."""
    if code == KV_RANGE:
        raise OverflowError("attend: a new key or value lies outside float16's range (|x| >= 65520 rounds to "
                            "infinity) and cannot be kept in the float16 KV cache: set rollout.kv_cache_dtype='model'")
    if code == KV_UNSUPPORTED:
        raise ValueError("attend: no float16 or int8 KV cache in this build or at this head size (kv_half_usable, "
                         "kv_int8_usable)")
    if code == DECODE_BAD_OP:
        raise ValueError("decode_layers: an op record of unknown kind (decode_op's kinds are DECODE_NORM, "
                         "DECODE_LINEAR, DECODE_SWIGLU and DECODE_ATTEND)")
    if code:
        raise MemoryError(f"attend: the kernel could not allocate its per-thread scratch ({code} rows left undone)")


DECODE_NORM, DECODE_LINEAR, DECODE_SWIGLU, DECODE_ATTEND, DECODE_OP = 0, 1, 2, 3, 18  # decode.c's tilt_decode_layers
DECODE_BAD_OP = -3  # decode.c's TILT_DECODE_BAD_OP: what it returns for a record of another kind


def decode_op(kind: int, *args) -> list[int]:
    """One record of ``tilt_decode_layers``' ops: ``kind`` (``DECODE_NORM`` ...) and its arguments as decode.c lists
    them, pointers and sizes as integers (None as 0), a float as its float32 bits; zero-padded to ``DECODE_OP``."""
    rec = [kind] + [0 if a is None else struct.unpack("<i", struct.pack("<f", a))[0] if isinstance(a, float)
                    else int(a) for a in args]
    if len(rec) > DECODE_OP:
        raise ValueError(f"decode_op: {len(rec)} entries for a record of {DECODE_OP}")
    return rec + [0] * (DECODE_OP - len(rec))


def kv_half_usable(head_dim: int, lib=None) -> bool:
    """Whether ``attend`` keeps a float16 completion cache at this head size: the kernels loaded, built with F16C
    conversions, and a head size that is a multiple of 16 up to 128."""
    lib = lib or library()
    return lib is not None and bool(lib.tilt_kv_half()) and head_dim % 16 == 0 and head_dim <= 128


def kv_int8_usable(head_dim: int, lib=None) -> bool:
    """Whether ``attend`` keeps an int8 completion cache at this head size: the kernels loaded and a head size that
    is a multiple of 16 up to 128 (any build: without AVX-512 the conversions are plain C)."""
    lib = lib or library()
    return lib is not None and head_dim % 16 == 0 and head_dim <= 128


def attend_reference(y: Tensor, rot: Tensor, kc: Tensor, vc: Tensor, kp: Tensor, vp: Tensor, pad: Tensor,
                     t: int, nq: int, ks: Optional[Tensor] = None, vs: Optional[Tensor] = None) -> Tensor:
    """``attend`` in torch ops (the same function; used by the self-check and the tests)."""
    n, nkv, cap, d = kc.shape
    u, p = pad.shape
    g, rep = n // u, nq // nkv
    qk = torch.view_as_real(torch.view_as_complex(y[:, :(nq + nkv) * d].reshape(n, nq + nkv, d // 2, 2))
                            * rot[:, None]).reshape(n, nq + nkv, d)
    if kc.dtype == torch.int8:
        kc[:, :, t], ks[:, :, t] = quantize_int8(qk[:, nq:])
        vc[:, :, t], vs[:, :, t] = quantize_int8(y[:, (nq + nkv) * d:].reshape(n, nkv, d))
        keys = dequantize_int8(kc[:, :, :t + 1], ks[:, :, :t + 1])
        values = dequantize_int8(vc[:, :, :t + 1], vs[:, :, :t + 1])
    else:
        kc[:, :, t] = qk[:, nq:]
        vc[:, :, t] = y[:, (nq + nkv) * d:].reshape(n, nkv, d)
        keys, values = kc[:, :, :t + 1], vc[:, :, :t + 1]
    q = qk[:, :nq].reshape(n, nkv, rep, d)
    idx = torch.arange(n) // g
    s_p = torch.matmul(q, kp[idx].transpose(-1, -2)).masked_fill(pad[idx].bool()[:, None, None, :], -torch.inf)  # [N, nkv, rep, P]
    s_c = torch.matmul(q, keys.to(q.dtype).transpose(-1, -2))  # [N, nkv, rep, t+1]
    w = torch.softmax(torch.cat([s_p, s_c], -1), -1)
    o = torch.matmul(w[..., :p], vp[idx]) + torch.matmul(w[..., p:], values.to(q.dtype))
    return o.reshape(n, nq * d)


def _tf_self_check(lib, d: int, fixed, check) -> None:
    """``tf_attention`` and its backward against ``tf_attention_reference`` under autograd: 4 rows of 2
    prompts (not in prompt order), grouped-query heads, padding in a prompt and in a completion, 11
    queries (a partial block), q and keys read through non-contiguous views."""
    b, u, nq, nkv, p, t = 4, 2, 4, 2, 5, 11
    pidx = torch.tensor([1, 0, 0, 1])
    valid_p = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    valid_c = torch.ones(b, t, dtype=torch.bool)
    valid_c[2, 7:] = False
    q = fixed(b, t, nq, d).transpose(1, 2)  # [B, nq, T, d] as a view, as the pass hands it over
    kp, vp = fixed(u, p, nkv, d, seed=2.0).transpose(1, 2), fixed(u, p, nkv, d, seed=3.0).transpose(1, 2)
    kc, vc = fixed(b, t, nkv, d, seed=4.0).transpose(1, 2), fixed(b, t, nkv, d, seed=5.0).transpose(1, 2)
    do = fixed(b, t, nq, d, seed=6.0)
    scale = d ** -0.5
    leaves = [x.detach().clone().requires_grad_() for x in (q, kp, vp, kc, vc)]
    want = tf_attention_reference(*leaves, pidx, valid_p, valid_c, scale)
    want.backward(do)
    o, lse = tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, scale, lib)
    check(torch.allclose(o, want.detach(), atol=1e-5), f"tf_attention (head size {d})")
    dq, dk, dv = tf_attention_backward(q, kp, vp, kc, vc, pidx, valid_p, valid_c, o, lse, do, scale, lib)
    dkp = torch.zeros(u, nkv, p, d).index_add_(0, pidx, dk[:, :, :p])
    dvp = torch.zeros(u, nkv, p, d).index_add_(0, pidx, dv[:, :, :p])
    got = (dq.transpose(1, 2), dkp, dvp, dk[:, :, p:], dv[:, :, p:])
    check(all(torch.allclose(g, x.grad, atol=1e-4) for g, x in zip(got, leaves)),
          f"tf_attention_backward (head size {d})")
    # the rotation inside the kernel: the same as rotating q and kc first, gradients rotated back
    ang = fixed(b, t, d // 2, seed=7.0) * 3
    rot = torch.polar(torch.ones_like(ang), ang)

    def turn(x, r):  # [B, heads, T, d] times r [B, T, d/2] at each head
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (d // 2, 2)).contiguous()) * r[:, None])
    qr, kr = turn(q, rot).flatten(-2), turn(kc, rot).flatten(-2)
    o_r, lse_r = tf_attention(qr, kp, vp, kr, vc, pidx, valid_p, valid_c, scale, lib)
    o_k, lse_k = tf_attention(q, kp, vp, kc, vc, pidx, valid_p, valid_c, scale, lib, rot=rot)
    check(torch.allclose(o_k, o_r, atol=1e-5) and torch.allclose(lse_k, lse_r, atol=1e-5),
          f"tf_attention with rot (head size {d})")
    want = tf_attention_backward(qr, kp, vp, kr, vc, pidx, valid_p, valid_c, o_r, lse_r, do, scale, lib)
    dq, dk, dv = tf_attention_backward(q, kp, vp, kc, vc, pidx, valid_p, valid_c, o_k, lse_k, do, scale, lib,
                                       rot=rot)
    back = (turn(want[0].transpose(1, 2), rot.conj()).flatten(-2).transpose(1, 2), want[1][:, :, :p],
            turn(want[1][:, :, p:], rot.conj()).flatten(-2), want[2])
    got = (dq, dk[:, :, :p], dk[:, :, p:], dv)
    check(all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, back)), f"tf_attention_backward with rot "
          f"(head size {d})")


def _self_check(lib) -> None:
    """Each kernel against its torch expression on fixed inputs (not torch.randn: loading must not move
    the global RNG), attention at a general head size and at the two fixed-length forms the benchmark
    models use. Raises RuntimeError on a mismatch (not ``assert``, which ``python -O`` strips)."""
    def fixed(*shape, seed=1.0):
        return (torch.arange(float(torch.Size(shape).numel())) * 0.7311 + seed).sin().reshape(shape).contiguous()

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"self-check: {what} differs from what it is checked against (its torch expression "
                               f"unless named)")

    for m, n, k in ((3, 40, 24), (19, 64, 8)):  # a block tail, a partial panel; two full blocks and panels
        x, w, b = fixed(m, k), fixed(n, k, seed=2.0), fixed(n, seed=3.0)
        check(torch.allclose(linear(x, pack_linear(w, lib), n, b, lib), F.linear(x, w, b), atol=1e-5)
              and torch.allclose(linear(x, pack_linear(w, lib), n, None, lib), F.linear(x, w), atol=1e-5),
              f"linear ({m} x {k} x {n})")
        g = F.linear(x, w, b)  # a gated MLP's input with I = n / 2: silu(first half) * second half
        check(torch.allclose(linear_swiglu(x, pack_linear_swiglu(w, lib), n // 2, b, lib),
                             F.silu(g[:, :n // 2]) * g[:, n // 2:], atol=1e-5), f"linear_swiglu ({m} x {k} x {n})")
    h, x = fixed(3, 40), fixed(3, 40, seed=2.0)
    check(torch.allclose(add_rms_norm(h.clone(), x, 1e-6, lib), F.rms_norm(h + x, (40,), None, 1e-6), atol=1e-5),
          "add_rms_norm")
    gu = fixed(3, 48) * 4
    check(torch.allclose(silu_mul(gu, lib), F.silu(gu[:, :24]) * gu[:, 24:], atol=1e-5), "silu_mul")
    z, dy = gu.clone().requires_grad_(), fixed(3, 24, seed=3.0)
    (F.silu(z[:, :24]) * z[:, 24:]).backward(dy)
    check(torch.allclose(swiglu_backward(gu, dy, lib), z.grad, atol=1e-5), "swiglu_backward")
    x, w, dy = fixed(5, 40, seed=4.0) * 3, fixed(40, seed=5.0) + 1.5, fixed(5, 40, seed=6.0)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.rms_norm(xl, (40,), wl, 1e-6)
    want.backward(dy)
    y, r = rms_norm_forward(x, w, 1e-6, lib)
    dx, dw = rms_norm_backward(x, w, r, dy, lib=lib)
    check(torch.allclose(y, want.detach(), atol=1e-5), "rms_norm_forward")
    check(torch.allclose(dx, xl.grad, atol=1e-5) and torch.allclose(dw, wl.grad, atol=1e-4), "rms_norm_backward")
    logits, draws = fixed(6, 1100, seed=8.0) * 4, (fixed(6, seed=9.0) + 1) / 2.1
    for temperature, ban in ((1.0, None), (0.7, 3)):
        got = sample_rows(logits, draws, temperature, ban, lib)
        check(got is not None and sample_rows_agrees(*got, logits, draws, temperature, ban),
              f"sample_rows (temperature {temperature}, ban {ban})")
    for d in (16, 32, 64):  # teacher-forced attention: general head size and the two fixed-length forms
        _tf_self_check(lib, d, fixed, check)
    n, u, nq, nkv, p, cap, t = 4, 2, 4, 2, 5, 6, 3
    pad = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.uint8)
    for d in (8, 32, 64):
        y = fixed(n, (nq + 2 * nkv) * d) / d ** 0.5
        ang = fixed(n, d // 2, seed=3.0) * 3
        rot = torch.polar(torch.ones_like(ang), ang)
        kc, vc = fixed(n, nkv, cap, d, seed=4.0), fixed(n, nkv, cap, d, seed=5.0)
        kp, vp = fixed(u, nkv, p, d, seed=6.0), fixed(u, nkv, p, d, seed=7.0)
        kc2, vc2 = kc.clone(), vc.clone()
        got = attend(y, rot, kc, vc, kp, vp, pad, t, nq, lib)
        want = attend_reference(y, rot, kc2, vc2, kp, vp, pad, t, nq)
        check(torch.allclose(got, want, atol=1e-5) and torch.allclose(kc, kc2, atol=1e-6)
              and torch.equal(vc, vc2), f"attend (head size {d})")
        if kv_half_usable(d, lib):  # a float16 cache: the same attention over the same rounded keys and values
            kh, vh = kc.half(), vc.half()
            kh2, vh2 = kh.clone(), vh.clone()
            got = attend(y, rot, kh, vh, kp, vp, pad, t + 1, nq, lib)
            want = attend_reference(y, rot, kh2, vh2, kp, vp, pad, t + 1, nq)
            check(torch.allclose(got, want, atol=1e-5) and torch.allclose(kh.float(), kh2.float(), atol=1e-3)
                  and torch.equal(vh, vh2), f"attend with a float16 cache (head size {d})")
        if kv_int8_usable(d, lib):  # an int8 cache with its scales: the same attention over the same integers
            (k8, ks), (v8, vs) = quantize_int8(kc), quantize_int8(vc)
            k82, v82, ks2, vs2 = k8.clone(), v8.clone(), ks.clone(), vs.clone()
            got = attend(y, rot, k8, v8, kp, vp, pad, t + 1, nq, lib, ks, vs)
            want = attend_reference(y, rot, k82, v82, kp, vp, pad, t + 1, nq, ks2, vs2)
            check(torch.allclose(got, want, atol=1e-5) and int((k8.int() - k82.int()).abs().max()) <= 1
                  and torch.equal(v8, v82) and torch.equal(vs, vs2), f"attend with an int8 cache (head size {d})")
    _decode_layers_self_check(lib, fixed, check)


def _decode_layers_self_check(lib, fixed, check) -> None:
    """``tilt_decode_layers`` against the same calls made one at a time: one decode layer (RMS norm, the q/k/v
    product, attention with its cache write, the output product, add + norm, the gate/up product with SwiGLU, the
    down product, add + norm) of 4 rows of 2 prompts, a float cache; residual, outputs and cache equal bit for bit."""
    n, u, nq, nkv, d, p, cap, t, hid, inter = 4, 2, 2, 2, 32, 5, 6, 3, 64, 48
    width = (nq + 2 * nkv) * d
    pad = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.uint8)
    wq, wo = pack_linear(fixed(width, hid, seed=2.0), lib), pack_linear(fixed(hid, nq * d, seed=3.0), lib)
    wg, wd = pack_linear_swiglu(fixed(2 * inter, hid, seed=4.0), lib), pack_linear(fixed(hid, inter, seed=5.0), lib)
    rot = torch.view_as_real(torch.polar(torch.ones(n, d // 2), fixed(n, d // 2, seed=6.0) * 3)).contiguous()
    kp, vp = fixed(u, nkv, p, d, seed=7.0) / d ** 0.5, fixed(u, nkv, p, d, seed=8.0)
    runs = []
    for one in (True, False):
        h, kc, vc = fixed(n, hid, seed=9.0), fixed(n, nkv, cap, d, seed=10.0), fixed(n, nkv, cap, d, seed=11.0)
        x, y, a, o, g, m = (torch.empty(n, c) for c in (hid, width, nq * d, hid, inter, hid))
        ptr = _ptr
        calls = [(DECODE_NORM, (None, ptr(x), n, hid, 1e-5)),
                 (DECODE_LINEAR, (ptr(x), ptr(wq), None, ptr(y), n, width, hid)),
                 (DECODE_ATTEND, (ptr(y), ptr(kc), ptr(vc), ptr(kp), ptr(vp), ptr(pad), ptr(a), n, u, nq, nkv, d, p,
                                  cap)),
                 (DECODE_LINEAR, (ptr(a), ptr(wo), None, ptr(o), n, hid, nq * d)),
                 (DECODE_NORM, (ptr(o), ptr(x), n, hid, 1e-5)),
                 (DECODE_SWIGLU, (ptr(x), ptr(wg), None, ptr(g), n, inter, hid)),
                 (DECODE_LINEAR, (ptr(g), ptr(wd), None, ptr(m), n, hid, inter)),
                 (DECODE_NORM, (ptr(m), ptr(x), n, hid, 1e-6))]
        if one:
            ops = torch.tensor([decode_op(kind, *args, *((0, None, None) if kind == DECODE_ATTEND else ()))
                                for kind, args in calls], dtype=torch.int64)
            code = lib.tilt_decode_layers(ops.data_ptr(), ops.shape[0], h.data_ptr(), rot.data_ptr(), t)
        else:
            code = 0
            for kind, args in calls:
                if kind == DECODE_NORM:
                    lib.tilt_add_rms_norm(h.data_ptr(), *args)
                elif kind == DECODE_ATTEND:
                    code = code or lib.tilt_attend(args[0], rot.data_ptr(), *args[1:], t, 0, None, None)
                else:
                    (lib.tilt_linear_swiglu if kind == DECODE_SWIGLU else lib.tilt_linear)(*args)
        runs.append((code, h, kc, vc, x, y, a, o, g, m))
    check(runs[0][0] == runs[1][0] == 0 and all(torch.equal(p, q) for p, q in zip(runs[0][1:], runs[1][1:])),
          "decode_layers (one call for a layer; checked against the same calls one at a time)")
