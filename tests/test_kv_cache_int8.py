"""An int8 completion KV cache for the sampler (``rollout.kv_cache_dtype=int8``; speed work 47).

* ``quantize_int8`` keeps each vector as round(x 127 / max|x|) and max|x| / 127: hand values, zeros, the error bound.
* ``tilt_attend`` with an int8 cache keeps each new key and value as ``quantize_int8`` does and computes the same
  attention as the torch ops over the same cache (to float rounding); a head size without a vector path and missing
  scales are refused.
* Sampling with it: the recorded log-probs differ from the float32 teacher-forced forward by the quantization (more
  than the float16 cache's, under the tolerance below), the first token not at all (the fused kernel and the torch
  ops agree: tests/test_kv_cache_dtype.py); a 2-step run trains with token_tis; the config asks for a correction.
"""
from __future__ import annotations

import pytest
import torch

import tilt.kernels as kernels
from tilt.config import ConfigError, load_config

from test_decode_dtype import BASE
from test_kernels import _attend_inputs, needs_lib
from test_kv_cache_dtype import KV16_TOL, _sampler_against_forward, _trains_with_a_correction

KV8_TOL = 5e-3  # max |log-prob| difference of the test model's int8-cache sampler vs its float32 forward


def test_quantize_int8_hand_values_and_bound():
    """[1, -2, 0.5, 0] -> scale 2/127, integers round(x 63.5) = [64 (63.5 ties to even: 64), -127, 32 (31.75), 0];
    a zero vector -> zeros and scale 0; random vectors back within half a step, max|x| / 254."""
    q, s = kernels.quantize_int8(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]]
    assert s.tolist() == [pytest.approx(2 / 127), 0.0]
    x = torch.randn(50, 8, 32, generator=torch.Generator().manual_seed(0)) * torch.rand(50, 8, 1) * 10
    q, s = kernels.quantize_int8(x)
    back = kernels.dequantize_int8(q, s)
    assert bool(((back - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)).all())
    assert int(q.abs().max()) == 127


@needs_lib
@pytest.mark.parametrize("nq,nkv,d", [(8, 8, 32), (9, 3, 64), (4, 2, 128), (2, 1, 16), (4, 4, 48)])
@pytest.mark.parametrize("t,p", [(0, 7), (11, 7), (37, 19)])
def test_attend_with_an_int8_cache_equals_torch_ops(nq, nkv, d, t, p):
    """The kernel against ``attend_reference`` on the same int8 cache: the new value's integers and scale equal
    (the same float32 steps), the new key's integers within one step (its rotation is rounded to float in another
    order first), the output to float rounding."""
    assert kernels.kv_int8_usable(d)
    n, u, cap = 12, 3, 12 if t < 12 else 38
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=t)
    kc, ks = kernels.quantize_int8(kc)
    vc, vs = kernels.quantize_int8(vc)
    ref = [x.clone() for x in (kc, vc, ks, vs)]
    got = kernels.attend(y, rot, kc, vc, kp, vp, pad, t, nq, ks=ks, vs=vs)
    want = kernels.attend_reference(y, rot, ref[0], ref[1], kp, vp, pad, t, nq, ks=ref[2], vs=ref[3])
    assert kc.dtype == torch.int8 and vc.dtype == torch.int8
    assert torch.equal(vc, ref[1]) and torch.equal(vs, ref[3])
    assert int((kc.int() - ref[0].int()).abs().max()) <= 1
    torch.testing.assert_close(ks, ref[2], atol=0, rtol=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_lib
@pytest.mark.parametrize("t", [5, 15, 16, 30])
def test_attend_int8_never_reads_the_scales_past_its_position(t):
    """The kernel multiplies the softmax weights by the value scales 16 positions at a time (speed work 52): the
    scales past position t (not yet written: here NaN) are not read, and the output is the one with zeros there."""
    n, u, nq, nkv, d, p, cap = 4, 2, 4, 2, 32, 9, 40
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=t)
    (k8, ks), (v8, vs) = kernels.quantize_int8(kc), kernels.quantize_int8(vc)
    clean = [x.clone() for x in (k8, v8, ks, vs)]
    clean[3][:, :, t + 1:] = 0.0
    vs[:, :, t + 1:] = float("nan")
    got = kernels.attend(y, rot, k8, v8, kp, vp, pad, t, nq, ks=ks, vs=vs)
    want = kernels.attend(y, rot, *clean[:2], kp, vp, pad, t, nq, ks=clean[2], vs=clean[3])
    assert torch.isfinite(got).all() and torch.equal(got, want)


@needs_lib
def test_attend_int8_cache_differs_from_float32_by_the_quantization():
    """The same step with a float32 cache: outputs apart by more than float16's rounding and by less than a
    quantization step of the values."""
    n, u, nq, nkv, d, p, cap, t = 8, 2, 4, 2, 32, 9, 20, 17
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=3)
    full = kernels.attend(y, rot, kc.clone(), vc.clone(), kp, vp, pad, t, nq)
    half = kernels.attend(y, rot, kc.half(), vc.half(), kp, vp, pad, t, nq)
    (k8, ks), (v8, vs) = kernels.quantize_int8(kc), kernels.quantize_int8(vc)
    eight = kernels.attend(y, rot, k8, v8, kp, vp, pad, t, nq, ks=ks, vs=vs)
    diff16, diff8 = float((full - half).abs().max()), float((full - eight).abs().max())
    assert diff16 < diff8 < 4 * float(vc.abs().max()) / 254, (diff16, diff8)


@needs_lib
def test_attend_int8_cache_needs_scales_and_a_vector_head_size():
    """No scales (or scales of another shape) is a ValueError from the wrapper; a head size of 8 (the scalar loop) is
    refused by the kernel itself (TILT_KV_UNSUPPORTED, nothing written)."""
    n, u, nq, nkv, p, cap = 4, 2, 2, 2, 5, 3
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, 32, p, cap, seed=0)
    (k8, ks), (v8, vs) = kernels.quantize_int8(kc), kernels.quantize_int8(vc)
    with pytest.raises(ValueError, match="scales"):
        kernels.attend(y, rot, k8, v8, kp, vp, pad, 0, nq)
    with pytest.raises(ValueError, match="scales"):
        kernels.attend(y, rot, k8, v8, kp, vp, pad, 0, nq, ks=ks[:, :, :2], vs=vs)
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, 8, p, cap, seed=0)
    (k8, ks), (v8, vs) = kernels.quantize_int8(kc), kernels.quantize_int8(vc)
    before = [x.clone() for x in (k8, v8, ks, vs)]
    assert not kernels.kv_int8_usable(8)
    with pytest.raises(ValueError, match="no float16 or int8 KV cache"):
        kernels.attend(y, rot, k8, v8, kp, vp, pad, 0, nq, ks=ks, vs=vs)
    assert all(torch.equal(a, b) for a, b in zip((k8, v8, ks, vs), before))


@pytest.mark.parametrize("fused", [True, False])
def test_int8_cache_logprobs_within_tolerance_of_float32(tiny_llama_dir, monkeypatch, fused):
    """The grouped decoder keeps its completion cache in int8 with scales (fused kernel, and the torch ops where the
    kernels are off): the recorded log-probs differ from the float32 teacher-forced log-probs of the same tokens by
    more than the float16 cache's bound and at most KV8_TOL, the first token (from the float32 prefill) by float
    rounding only."""
    _, decoder, diff = _sampler_against_forward(tiny_llama_dir, monkeypatch, torch.int8, fused)
    assert decoder.ks[0].dtype == torch.float32 and decoder.ks[0].shape == decoder.kc[0].shape[:3]
    assert float(diff[:, 0].max()) <= 2e-6  # the first token: the prefill's, no cache read
    assert KV16_TOL < float(diff[:, 1:].max()) <= KV8_TOL, float(diff[:, 1:].max())


def test_int8_cache_config_needs_a_correction(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="correction.name"):
        load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'a'}",
                                  "rollout.kv_cache_dtype=int8"])


def test_int8_cache_trains_with_a_correction(tmp_path, tiny_llama_dir, monkeypatch):
    """A 2-step run with an int8 cache and token_tis (``_trains_with_a_correction``): the log-ratio above zero and
    within KV8_TOL, nothing masked."""
    _trains_with_a_correction(tmp_path, tiny_llama_dir, monkeypatch, "int8", torch.int8, KV8_TOL)
