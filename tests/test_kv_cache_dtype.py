"""A float16 completion KV cache for the sampler (``rollout.kv_cache_dtype``; speed work 44).

* ``tilt_attend`` with a float16 cache rounds each new key and value as torch's ``.half()`` does and computes the
  same attention as the torch ops over the same rounded cache (to float rounding).
* Sampling with it: the recorded log-probs differ from the float32 teacher-forced forward by the rounding of the
  keys and values (above zero, under the tolerance below), the first token (from the prefill) not at all.
* A key or value beyond float16's range stops with an error naming the setting, on both decoder paths; the
  config refuses it without a correction or without groups; a 2-step run trains with token_tis.
"""
from __future__ import annotations

import json

import pytest
import torch

import tilt.kernels as kernels
from tilt.config import ConfigError, load_config
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate, sequence_logprobs
from tilt.trainer import train

from test_decode_dtype import BASE, _even  # the short run's settings and reward of the bf16-sampling tests
from test_kernels import _attend_inputs, needs_lib

PROMPTS = ["47+85=", "cd 3 5 7>22:", "sort 53 7 21:", "9*9="]
KV16_TOL = 1e-4  # max |log-prob| difference of the test model's float16-cache sampler vs its float32 forward


@needs_lib
@pytest.mark.parametrize("nq,nkv,d", [(8, 8, 32), (9, 3, 64), (4, 2, 128), (2, 1, 16), (4, 4, 48)])
@pytest.mark.parametrize("t,p", [(0, 7), (11, 7), (37, 19)])
def test_attend_with_a_float16_cache_equals_torch_ops(nq, nkv, d, t, p):
    """The kernel against ``attend_reference`` on the same float16 cache: the new value's halves bit-equal
    (both round to nearest even), the new key's within one half-precision step (the rotation is rounded to
    float first, in another order), the output to float rounding (test_kernels holds the float32 form against
    float64)."""
    assert kernels.kv_half_usable(d)
    n, u, cap = 12, 3, 12 if t < 12 else 38
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=t)
    kc, vc = kc.half(), vc.half()
    ref = [x.clone() for x in (kc, vc)]
    got = kernels.attend(y, rot, kc, vc, kp, vp, pad, t, nq)
    want = kernels.attend_reference(y, rot, *ref, kp, vp, pad, t, nq)
    assert kc.dtype == torch.float16 and vc.dtype == torch.float16
    torch.testing.assert_close(vc, ref[1], atol=0, rtol=0)
    torch.testing.assert_close(kc.float(), ref[0].float(), atol=0, rtol=2 ** -10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_lib
def test_attend_float16_cache_differs_from_float32_by_the_rounding():
    """The same step with a float32 cache: outputs apart by more than float rounding and by less than the
    halves' relative step 2^-11 times the values' size (the cache's rounding, not another function)."""
    n, u, nq, nkv, d, p, cap, t = 8, 2, 4, 2, 32, 9, 20, 17
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=3)
    full = kernels.attend(y, rot, kc.clone(), vc.clone(), kp, vp, pad, t, nq)
    half = kernels.attend(y, rot, kc.half(), vc.half(), kp, vp, pad, t, nq)
    diff = float((full - half).abs().max())
    assert 1e-5 < diff < 4 * 2 ** -11 * float(vc.abs().max()), diff


@needs_lib
def test_attend_float16_cache_out_of_range_is_an_error():
    """A new value of 1e5 (float16's largest is 65504) is refused with an error naming the setting; the kernel
    reports it (TILT_KV_RANGE), also when other rows are fine."""
    n, u, nq, nkv, d, p, cap = 4, 2, 2, 2, 32, 5, 3
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, d, p, cap, seed=0)
    y[2, (nq + nkv) * d + 5] = 1e5  # row 2's value, key head 0
    with pytest.raises(OverflowError, match="rollout.kv_cache_dtype"):
        kernels.attend(y, rot, kc.half(), vc.half(), kp, vp, pad, 0, nq)
    y[2, (nq + nkv) * d + 5] = 6e4  # within range: fine
    kernels.attend(y, rot, kc.half(), vc.half(), kp, vp, pad, 0, nq)


@needs_lib
def test_attend_rejects_caches_it_has_no_path_for():
    """A cache neither float32, float16 nor int8, or keys and values of two dtypes, is a ValueError from the wrapper; a
    float16 cache at a head size without a half path (8: the scalar loop) is refused by the kernel itself
    (TILT_KV_UNSUPPORTED, nothing written) and named by ``attend_done``."""
    n, u, nq, nkv, p, cap = 4, 2, 2, 2, 5, 3
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, 32, p, cap, seed=0)
    with pytest.raises(ValueError, match="float32, float16 or int8"):
        kernels.attend(y, rot, kc.double(), vc.double(), kp, vp, pad, 0, nq)
    with pytest.raises(ValueError, match="float32, float16 or int8"):
        kernels.attend(y, rot, kc.half(), vc, kp, vp, pad, 0, nq)
    y, rot, kc, vc, kp, vp, pad = _attend_inputs(n, u, nq, nkv, 8, p, cap, seed=0)
    kh, vh, out = kc.half(), vc.half(), torch.full((n, nq * 8), 7.0)
    before = (kh.clone(), vh.clone())
    lib, ptr = kernels.library(), kernels._ptr
    code = lib.tilt_attend(ptr(y), ptr(torch.view_as_real(rot)), ptr(kh), ptr(vh), ptr(kp), ptr(vp), ptr(pad),
                           ptr(out), n, u, nq, nkv, 8, p, cap, 0, 1, None, None)
    assert code == kernels.KV_UNSUPPORTED and not kernels.kv_half_usable(8)
    assert torch.equal(kh, before[0]) and torch.equal(vh, before[1]) and bool((out == 7.0).all())
    with pytest.raises(ValueError, match="no float16 or int8 KV cache"):
        kernels.attend_done(code)


def _rollout(pol, prompts, kv_dtype, **kw):
    ids, mask = encode_prompts(pol.tokenizer, prompts)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, kv_dtype=kv_dtype, **kw)
    return generate(pol.model, ids, mask, params=params, eos_id=pol.eos_id, pad_id=pol.pad_id,
                    generator=torch.Generator().manual_seed(1))


def _decoders(monkeypatch):
    import tilt.rollout as rollout
    made = []
    orig = rollout.grouped_decoder
    monkeypatch.setattr(rollout, "grouped_decoder", lambda *a, **k: made.append(orig(*a, **k)) or made[-1])
    return made


def _sampler_against_forward(tiny_llama_dir, monkeypatch, kv_dtype, fused):
    """(the policy, the grouped decoder that sampled, |recorded log-prob - float32 teacher-forced log-prob| [N, T]) for
    one sampling with a ``kv_dtype`` completion cache, through the fused kernel or (fused False) the torch ops."""
    import tilt.fastdecode as fastdecode
    if not fused:
        monkeypatch.setattr(fastdecode.kernels, "usable", lambda *a: False)
    made = _decoders(monkeypatch)
    pol = load_policy(str(tiny_llama_dir))
    b = _rollout(pol, PROMPTS * 2, kv_dtype)
    assert len(made) == 1 and made[0] is not None and made[0].fused == fused
    assert made[0].kc[0].dtype == kv_dtype and made[0].vc[0].dtype == kv_dtype
    with torch.no_grad():
        lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    return pol, made[0], (lp * b.completion_mask - b.logprobs).abs().detach()


@pytest.mark.parametrize("fused", [True, False])
def test_float16_cache_logprobs_within_tolerance_of_float32(tiny_llama_dir, monkeypatch, fused):
    """The grouped decoder keeps its completion cache in float16 (fused kernel, and the torch ops where the kernels
    are off): the recorded log-probs differ from the float32 teacher-forced log-probs of the same tokens by the
    rounding (more than 4x the float32 cache's float rounding, at most KV16_TOL), the first token (from the float32
    prefill) by float rounding only."""
    pol, _, diff = _sampler_against_forward(tiny_llama_dir, monkeypatch, torch.float16, fused)
    full = _rollout(pol, PROMPTS * 2, None)  # the float32 cache: the log-probs agree to float rounding
    with torch.no_grad():
        lp32, _ = sequence_logprobs(pol.model, full.prompt_ids, full.prompt_mask, full.completion_ids,
                                    full.completion_mask)
    rounding = float((lp32 * full.completion_mask - full.logprobs).abs().max())  # 4.8e-7 here
    assert float(diff[:, 0].max()) <= 2 * rounding + 1e-7  # the first token: the prefill's, no cache read
    assert 4 * rounding < float(diff[:, 1:].max()) <= KV16_TOL, (rounding, float(diff[:, 1:].max()))  # 8.6e-6 here


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-5), (torch.int8, 1e-4)], ids=["float16", "int8"])
def test_cache_kernel_and_torch_paths_agree(tiny_llama_dir, monkeypatch, dtype, atol):
    """The fused kernel and the torch ops over float16 (and int8, tests/test_kv_cache_int8.py) caches sample the same
    tokens with log-probs equal to float rounding (same seed; an int8 key may differ by one step where its rotation
    rounds apart)."""
    import tilt.fastdecode as fastdecode
    pol = load_policy(str(tiny_llama_dir))
    a = _rollout(pol, PROMPTS * 2, dtype)
    monkeypatch.setattr(fastdecode.kernels, "usable", lambda *a: False)
    b = _rollout(pol, PROMPTS * 2, dtype)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


@needs_lib
@pytest.mark.parametrize("one_call", [True, False])
def test_float16_cache_out_of_range_kernel_path(tiny_llama_dir, monkeypatch, one_call):
    """Sampling through the fused step, its layers in one library call a token (``tilt_decode_layers``) or one call
    each, reports a value beyond float16's range with the error naming the setting."""
    import tilt.fastdecode as fastdecode
    monkeypatch.setattr(fastdecode, "ONE_CALL", one_call)
    made = []
    monkeypatch.setattr(fastdecode.GroupedDecoder, "_fused_step",
                        lambda self, *a, _f=fastdecode.GroupedDecoder._fused_step: made.append(1) or _f(self, *a))
    pol = load_policy(str(tiny_llama_dir))
    with torch.no_grad():
        pol.model.model.layers[1].self_attn.v_proj.weight.mul_(1e7)
    with pytest.raises(OverflowError, match="rollout.kv_cache_dtype"):
        _rollout(pol, PROMPTS * 2, torch.float16)
    assert made  # the fused step ran


def test_float16_cache_out_of_range_torch_path(tiny_llama_dir, monkeypatch):
    """The torch ops path reports a key or value beyond float16's range with the same error."""
    import tilt.fastdecode as fastdecode
    monkeypatch.setattr(fastdecode.kernels, "usable", lambda *a: False)
    pol = load_policy(str(tiny_llama_dir))
    with torch.no_grad():
        pol.model.model.layers[0].self_attn.v_proj.weight.mul_(1e7)
    with pytest.raises(OverflowError, match="rollout.kv_cache_dtype"):
        _rollout(pol, PROMPTS * 2, torch.float16)


def test_float16_cache_where_the_grouped_decoder_does_not_apply(tiny_llama_dir, monkeypatch):
    """A batch not in equal groups (one prompt drawn twice in a step of G samples each) samples with a cache in the
    model's dtype: the same tokens and log-probs as without the setting. Without the lean decoders it is an error
    naming the cause."""
    made = _decoders(monkeypatch)
    pol = load_policy(str(tiny_llama_dir))
    uneven = PROMPTS * 2 + PROMPTS[:1] * 2  # the first prompt has 4 rows, the others 2
    a, b = _rollout(pol, uneven, torch.float16), _rollout(pol, uneven, None)
    assert not [d for d in made if d is not None]  # no grouped decoder was built
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    with pytest.raises(ValueError, match="grouped decoder"):
        _rollout(pol, PROMPTS * 2, torch.float16, lean=False)


def test_float16_cache_config_errors(tmp_path, tiny_llama_dir):
    """No correction, or one completion per prompt, is a ConfigError naming the fix."""
    with pytest.raises(ConfigError, match="correction.name"):
        load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'a'}",
                                  "rollout.kv_cache_dtype=float16"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'b'}",
                                  "rollout.kv_cache_dtype=float16", "correction.name=token_tis",
                                  "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'c'}",
                                  "rollout.kv_cache_dtype=bfloat16", "correction.name=token_tis"])


def _trains_with_a_correction(tmp_path, tiny_llama_dir, monkeypatch, setting: str, dtype: torch.dtype, tol: float):
    """A 2-step run samples with ``rollout.kv_cache_dtype=setting`` and corrects with token_tis: every grouped decoder
    kept its cache in ``dtype``, and the logged sampler/learner log-ratio is above zero and within ``tol`` (nothing
    masked)."""
    made = _decoders(monkeypatch)
    out = tmp_path / "run"
    cfg = load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={out}",
                                    f"rollout.kv_cache_dtype={setting}", "correction.name=token_tis"])
    train(cfg, reward_fns=[_even], echo=lambda _: None)
    assert made and all(d is not None and d.kc[0].dtype == dtype for d in made)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 2 and all(r["train/skipped"] == 0 for r in steps)
    assert all(0 < r["mismatch/log_ratio_abs_max"] < tol and r["mismatch/masked_frac"] == 0 for r in steps)


def test_float16_cache_trains_with_a_correction(tmp_path, tiny_llama_dir, monkeypatch):
    """A 2-step run with a float16 cache and token_tis (``_trains_with_a_correction``), within KV16_TOL."""
    _trains_with_a_correction(tmp_path, tiny_llama_dir, monkeypatch, "float16", torch.float16, KV16_TOL)


def test_float16_cache_with_bf16_products(tiny_llama_dir, monkeypatch):
    """The two sampler settings combine: bf16 decode products over a float16 completion cache."""
    made = _decoders(monkeypatch)
    pol = load_policy(str(tiny_llama_dir))
    b = _rollout(pol, PROMPTS * 2, torch.float16, matmul_dtype=torch.bfloat16)
    assert made[0].kc[0].dtype == torch.float16 and made[0].layers[0]["qkv"][0].dtype == torch.bfloat16
    with torch.no_grad():
        lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    assert 0 < float((lp * b.completion_mask - b.logprobs).abs().max()) <= 0.05  # test_decode_dtype's BF16_TOL
