"""bf16 decode matmuls (``rollout.decode_dtype``) and the on-policy learner log-probs of a correction.

* The lean decoders multiply in bf16 when asked; the recorded log-probs are the bf16 sampler's, so they
  differ from a float32 teacher-forced forward by bf16 rounding (documented tolerance below), never by
  more, and never by nothing (the products really ran in bf16).
* ``correction.name`` with one optimizer step per batch skips the learner-log-prob pass: the learner's
  own forward gives log pi_old. Loss and gradients equal the pass's to 1e-6 (fp32).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import tilt.providers.frozen as frozen
from tilt.config import ConfigError, load_config
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate, sequence_logprobs
from tilt.trainer import build, rollout_step, train
from tilt.wiring.sampling import TrainStream

PROMPTS = ["47+85=", "cd 3 5 7>22:", "sort 53 7 21:", "9*9="]
BF16_TOL = 0.05  # max |log-prob| difference of the tiny test model's bf16 sampler vs its float32 forward


def _rollout(pol, prompts, dtype, **kw):
    ids, mask = encode_prompts(pol.tokenizer, prompts)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, matmul_dtype=dtype, **kw)
    return generate(pol.model, ids, mask, params=params, eos_id=pol.eos_id, pad_id=pol.pad_id,
                    generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("grouped", [True, False])
def test_bf16_decode_logprobs_within_tolerance_of_float32(tiny_llama_dir, grouped):
    """Both lean decoders (prompts in equal groups, and distinct prompts) sample with bf16 products:
    their log-probs differ from the float32 teacher-forced log-probs of the same tokens by bf16
    rounding (0 < max diff <= 0.05 on the test model); the first token, from the float32 prefill, agrees
    to 1e-5."""
    import tilt.fastdecode as fastdecode
    import tilt.rollout as rollout

    pol = load_policy(str(tiny_llama_dir))
    made = []
    spies = {}
    for name in ("grouped_decoder", "lean_decoder"):
        orig = getattr(rollout, name)
        spies[name] = orig
        setattr(rollout, name, lambda *a, _o=orig, **k: made.append(_o(*a, **k)) or made[-1])
    try:
        b = _rollout(pol, PROMPTS * 2 if grouped else PROMPTS, torch.bfloat16)
    finally:
        for name, orig in spies.items():
            setattr(rollout, name, orig)
    dec = [d for d in made if d is not None]
    assert len(dec) == 1 and isinstance(dec[0], fastdecode.GroupedDecoder) == grouped
    assert dec[0].layers[0]["qkv"][0].dtype == torch.bfloat16 and dec[0].lm[0].dtype == torch.bfloat16
    lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    diff = (lp * b.completion_mask - b.logprobs).abs().detach()  # [N, T]
    assert float(diff[:, 0].max().detach()) < 1e-5
    assert 0 < float(diff[:, 1:].max()) <= BF16_TOL


def test_float32_decode_is_unchanged_by_the_option(tiny_llama_dir):
    """matmul_dtype=None and matmul_dtype=float32 sample the same tokens with the same log-probs."""
    pol = load_policy(str(tiny_llama_dir))
    a, b = _rollout(pol, PROMPTS * 2, None), _rollout(pol, PROMPTS * 2, torch.float32)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)


def test_bf16_decode_needs_the_lean_decoder(tiny_llama_dir):
    pol = load_policy(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="lean decoder"):
        _rollout(pol, PROMPTS, torch.bfloat16, lean=False)


BASE = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "tasks.mix=addition:1", "tasks.eval_per_cell=1", "eval.n_samples=1", "eval.max_new_tokens=6",
        "log.tensorboard=false", "log.plot=false", "log.progress=none", "threads=1", "optim.lr=0.01",
        "checkpoint.every=100", "train.minibatches=1", "train.epochs=1"]


def _even(prompts, completions, **_):
    return [float(len(c) % 2 == 0) for c in completions]


def test_bf16_decode_config_errors(tmp_path, tiny_llama_dir):
    """No correction (when the config loads), or a policy the lean decoder cannot run (bf16 weights, when the
    run is built), is a ConfigError naming the fix."""
    with pytest.raises(ConfigError, match="correction.name"):
        load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'a'}",
                                  "rollout.decode_dtype=bfloat16"])
    cfg = load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'b'}",
                                    "rollout.decode_dtype=bfloat16", "correction.name=token_tis",
                                    "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="lean decoder"):
        build(cfg, reward_fns=[_even])


def test_bf16_decode_trains_with_a_correction_and_no_extra_pass(tmp_path, tiny_llama_dir, monkeypatch):
    """A 2-step run samples with bf16 products and corrects with token_tis. One optimizer step per batch,
    so the learner-log-prob pass is skipped (it would raise here); the logged mismatch is above zero."""
    orig = frozen.sequence_logprobs

    def no_policy_pass(model, *a, **k):  # the reference pass (frozen weights) still runs
        if any(p.requires_grad for p in model.parameters()):
            raise AssertionError("the learner-log-prob pass ran")
        return orig(model, *a, **k)

    monkeypatch.setattr(frozen, "sequence_logprobs", no_policy_pass)
    out = tmp_path / "run"
    cfg = load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={out}",
                                    "rollout.decode_dtype=bfloat16", "correction.name=token_tis"])
    train(cfg, reward_fns=[_even], echo=lambda _: None)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 2 and all(r["train/skipped"] == 0 for r in steps)
    assert all(0 < r["mismatch/k3"] < 1e-2 for r in steps)


@pytest.mark.parametrize("dtype", ["model", "bfloat16"])
def test_on_policy_old_logp_equals_the_learner_pass(tmp_path, tiny_llama_dir, dtype):
    """With one optimizer step per batch, old_logp from the learner's own forward gives the loss, the
    correction's metrics and the gradients of the separate learner-log-prob pass (to 1e-6, fp32)."""
    cfg = load_config(None, BASE + [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'r'}",
                                    "correction.name=token_tis", f"rollout.decode_dtype={dtype}",
                                    "kl.beta=0.04", "train.micro_batch_tokens=16"])
    parts = build(cfg, reward_fns=[_even])
    learner = parts.learner
    assert learner.old_logp_from_forward
    batch, _, _ = rollout_step(parts, cfg, TrainStream(cfg.tasks.mix, offset=0), 1)
    assert torch.equal(batch.old_logp, batch.sampler_logp)  # no pass ran: old_logp is still the sampler's
    with torch.no_grad():
        lp, _ = sequence_logprobs(parts.policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                  batch.completion_mask, temperature=cfg.rollout.temperature)
    passed = replace(batch, old_logp=lp * batch.completion_mask)  # what the skipped pass would give

    def loss_and_grads(b, from_forward):
        learner.old_logp_from_forward = from_forward
        learner.model.zero_grad(set_to_none=True)
        rows = torch.arange(b.completion_ids.shape[0])
        total, stats = 0.0, {}
        micro = learner.micro_batches(b, rows)
        assert len(micro) > 1  # micro-batches: each forward's old_logp is its own
        for m in micro:
            loss, st = learner.micro_loss(b.select(m), float(b.completion_mask.sum()))
            loss.backward()
            total += float(loss)
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v
        return total, stats, [p.grad.clone() for p in learner.model.parameters()]

    l1, s1, g1 = loss_and_grads(batch, True)
    l2, s2, g2 = loss_and_grads(passed, False)
    assert abs(l1 - l2) <= 1e-6
    for k in ("mismatch/k3", "mismatch/weight_mean", "kl/mean"):
        assert abs(s1[k] - s2[k]) <= 1e-6, k
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    if dtype == "bfloat16":
        assert s1["mismatch/k3"] > 0


@pytest.mark.parametrize("grouped", [True, False])
def test_packed_bf16_products_equal_unpacked(tiny_llama_dir, monkeypatch, grouped):
    """Speed work 32: the bf16 products packed once into oneDNN's layout (``DNN_BF16_PACKING``, where
    the CPU runs bf16 natively) sample the same tokens with the same log-probs as bf16 ``F.linear``
    (both accumulate in float32 over bf16 operands; equal here, 1e-6 allowed for summation order)."""
    import tilt.fastdecode as fastdecode
    import tilt.rollout as rollout

    pol = load_policy(str(tiny_llama_dir))
    made = []
    orig = rollout.grouped_decoder if grouped else rollout.lean_decoder
    name = "grouped_decoder" if grouped else "lean_decoder"
    monkeypatch.setattr(rollout, name, lambda *a, **k: made.append(orig(*a, **k)) or made[-1])
    prompts = PROMPTS * 2 if grouped else PROMPTS
    packed = _rollout(pol, prompts, torch.bfloat16)
    dec = made[-1]
    assert dec is not None
    qkv = dec.layers[0]["qkv"]
    if fastdecode.DNN_BF16_PACKING:
        assert len(qkv) == 4 and qkv[2].is_mkldnn and len(dec.lm) == 4
    else:  # no native bf16 on this CPU: nothing packed, the comparison below is of one path with itself
        assert len(qkv) == 2
    monkeypatch.setattr(fastdecode, "DNN_BF16_PACKING", False)
    plain = _rollout(pol, prompts, torch.bfloat16)
    assert len(made[-1].layers[0]["qkv"]) == 2
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-6, rtol=0)
