"""Rollout: KV-cache sampling log-probs equal a teacher-forced forward pass; masks and EOS."""
from __future__ import annotations

import pytest
import torch

from tilt.model import load_policy
from tilt.rollout import (SamplingParams, cache_kw, continue_from, decode_completions, encode_prompts, generate,
                          left_pad, masked_rows, sequence_logprobs)

PROMPTS = ["47+85=", "cd 3 5 7>22:", "sort 53 7 21:", "9*9="]


def _rollout(pol, prompts, **kw):
    ids, mask = encode_prompts(pol.tokenizer, prompts)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(**{"max_new_tokens": 12, **kw})
    return generate(pol.model, ids, mask, params=params, eos_id=pol.eos_id, pad_id=pol.pad_id, generator=g)


def test_rollout_logprobs_equal_teacher_forced(tiny_llama_dir):
    """Per-token log-probs from the KV-cache loop match one full forward pass (atol 1e-5, fp32),
    with left-padded prompts of different lengths."""
    pol = load_policy(str(tiny_llama_dir))
    b = _rollout(pol, PROMPTS * 4)
    lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    m = b.completion_mask.float()
    assert m.sum() > 20
    torch.testing.assert_close(lp * m, b.logprobs, atol=1e-5, rtol=0)


def test_rollout_logprobs_at_temperature_match(tiny_llama_dir):
    """At T=0.7 the reported log-probs are those of softmax(logits / 0.7)."""
    pol = load_policy(str(tiny_llama_dir))
    b = _rollout(pol, PROMPTS, temperature=0.7)
    lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask,
                              temperature=0.7)
    torch.testing.assert_close(lp * b.completion_mask, b.logprobs, atol=1e-5, rtol=0)


def test_mask_stops_after_eos_and_pads(tiny_llama_dir):
    pol = load_policy(str(tiny_llama_dir))
    b = _rollout(pol, PROMPTS * 8, max_new_tokens=30)
    for ids, m in zip(b.completion_ids.tolist(), b.completion_mask.tolist()):
        if pol.eos_id in ids:
            e = ids.index(pol.eos_id)
            assert all(m[: e + 1]) and not any(m[e + 1:])
            assert all(t == pol.pad_id for t in ids[e + 1:])
        else:
            assert all(m)
    assert (b.logprobs[b.completion_mask == 0] == 0).all()


def test_padding_does_not_change_samples(tiny_llama_dir):
    """A prompt sampled alone or next to a longer one (so left-padded) gets the same greedy completion."""
    pol = load_policy(str(tiny_llama_dir))
    alone = _rollout(pol, ["9*9="], temperature=0.0)
    padded = _rollout(pol, ["9*9=", "sort 53 7 21 8 9:"], temperature=0.0)
    n = int(alone.completion_mask[0].sum())
    assert alone.completion_ids[0, :n].tolist() == padded.completion_ids[0, :n].tolist()
    torch.testing.assert_close(alone.logprobs[0, :n], padded.logprobs[0, :n], atol=1e-5, rtol=0)


def test_seed_control(tiny_llama_dir):
    pol = load_policy(str(tiny_llama_dir))
    a, b = _rollout(pol, PROMPTS), _rollout(pol, PROMPTS)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_top_p_keeps_only_the_nucleus(tiny_llama_dir):
    """With top_p tiny, sampling equals greedy (only the argmax token is in the nucleus)."""
    pol = load_policy(str(tiny_llama_dir))
    greedy = _rollout(pol, PROMPTS, temperature=0.0)
    nucleus = _rollout(pol, PROMPTS, top_p=1e-6)
    assert torch.equal(greedy.completion_ids, nucleus.completion_ids)


def test_continue_from_prefix_matches_full_greedy(tiny_llama_dir):
    """Greedy continuation after the first 3 generated tokens reproduces the rest of a greedy rollout."""
    pol = load_policy(str(tiny_llama_dir))
    full = _rollout(pol, PROMPTS, temperature=0.0, max_new_tokens=10)
    k = 3
    cont = continue_from(pol.model, full.prompt_ids, full.prompt_mask, full.completion_ids[:, :k],
                         full.completion_mask[:, :k], params=SamplingParams(7, 0.0), eos_id=pol.eos_id,
                         pad_id=pol.pad_id)
    for i in range(len(PROMPTS)):
        if not full.completion_mask[i, k - 1]:
            continue
        n = int(full.completion_mask[i, k:].sum())
        assert cont.completion_ids[i, :n].tolist() == full.completion_ids[i, k:k + n].tolist()
        torch.testing.assert_close(cont.logprobs[i, :n], full.logprobs[i, k:k + n], atol=1e-5, rtol=0)


def test_decode_strips_eos_and_padding(tiny_llama_dir):
    pol = load_policy(str(tiny_llama_dir))
    b = _rollout(pol, PROMPTS)
    for text in decode_completions(pol.tokenizer, b, pol.eos_id):
        assert "<eos>" not in text and "<pad>" not in text


def test_min_new_tokens_forces_length_and_keeps_teacher_forced_logprobs(tiny_llama_dir):
    """With min_new_tokens = max_new_tokens no completion ends early (EOS is never sampled before
    it), and the reported log-probs are still the policy's own (EOS keeps its mass), so they equal
    a teacher-forced pass."""
    pol = load_policy(str(tiny_llama_dir))
    pol.model.lm_head.weight.data[pol.eos_id] += 3.0  # make EOS likely, so the ban matters
    free = _rollout(pol, PROMPTS * 4)
    assert free.completion_mask.sum(-1).min() < 12, "without the ban some completion must stop early"
    b = _rollout(pol, PROMPTS * 4, min_new_tokens=12)
    assert b.completion_ids.shape[1] == 12 and bool(b.completion_mask.bool().all())
    assert not bool((b.completion_ids == pol.eos_id).any())
    lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    torch.testing.assert_close(lp, b.logprobs, atol=1e-5, rtol=0)


def test_preallocated_cache_equals_default_cache(tiny_llama_dir):
    """The buffer KV cache changes no number: same samples and log-probs as HF's growing cache."""
    import tilt.rollout as rollout

    pol = load_policy(str(tiny_llama_dir))
    assert rollout.preallocated_cache(pol.model, 32) is not None
    fast = _rollout(pol, PROMPTS * 2)
    orig = rollout.preallocated_cache
    rollout.preallocated_cache = lambda model, capacity: None
    try:
        slow = _rollout(pol, PROMPTS * 2)
    finally:
        rollout.preallocated_cache = orig
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-6, rtol=0)


def test_shared_prompt_forward_equals_plain_forward(tiny_llama_dir):
    """Each distinct prompt runs once and its KV cache serves its G rows (left-padded prompts of
    different lengths): logits, hidden states and parameter gradients equal the plain forward."""
    from shared_prefix import assert_shared_prefix_forward_is_exact

    assert_shared_prefix_forward_is_exact(load_policy(str(tiny_llama_dir)), PROMPTS)


def test_lean_decoder_equals_hf_forward(tiny_llama_dir):
    """tilt.fastdecode's fused decode step gives the same samples and log-probs as HF's forward
    (left-padded prompts, 12 tokens), and its log-probs equal a teacher-forced pass."""
    from tilt.fastdecode import lean_decoder
    from tilt.rollout import preallocated_cache

    pol = load_policy(str(tiny_llama_dir))
    assert lean_decoder(pol.model, preallocated_cache(pol.model, 8)) is not None
    fast = _rollout(pol, PROMPTS * 2)
    slow = _rollout(pol, PROMPTS * 2, lean=False)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    lp, _ = sequence_logprobs(pol.model, fast.prompt_ids, fast.prompt_mask, fast.completion_ids,
                              fast.completion_mask)
    torch.testing.assert_close(lp * fast.completion_mask, fast.logprobs, atol=1e-5, rtol=0)


def test_hf_forward_gets_the_cache_by_the_installed_name(tiny_llama_dir):
    """Sampling through Hugging Face's forward (``lean=False``: the prefill of shared prompts and every
    token) hands the KV cache over by the keyword the installed transformers declares: ``cache`` where the
    forward signature has it (5.25 deprecates ``past_key_values`` with a warning and 5.40 removes it), else
    ``past_key_values``; never the other. The samples are those of the lean decoder either way."""
    import inspect

    from tilt.rollout import cache_kw, output_cache

    pol = load_policy(str(tiny_llama_dir))
    want = "cache" if "cache" in inspect.signature(type(pol.model).forward).parameters else "past_key_values"
    other = {"cache", "past_key_values"} - {want}
    seen = []
    forward = pol.model.forward

    def spy(*args, **kwargs):
        seen.append(set(kwargs) & {"cache", "past_key_values"})
        return forward(*args, **kwargs)

    pol.model.forward = spy
    try:
        slow = _rollout(pol, PROMPTS * 2, lean=False)
    finally:
        del pol.model.forward
    assert len(seen) > 2 and all(keys == {want} for keys in seen), seen
    assert not any(keys & other for keys in seen)
    fast = _rollout(pol, PROMPTS * 2)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert cache_kw(pol.model, None) == {want: None}
    out = pol.model(input_ids=torch.tensor([[5, 6]]), use_cache=True)
    assert output_cache(out) is not None and output_cache(out).get_seq_length() == 2


def test_grouped_decoder_equals_per_row_cache(tiny_llama_dir):
    """Prompts shared in equal groups (rows a b c d a b c d, G = 2, left-padded to different
    lengths) decode with each prompt's keys held once (GroupedDecoder): the same tokens as the
    per-row-cache lean step, and log-probs equal to float rounding (1e-6)."""
    import tilt.fastdecode as fastdecode
    import tilt.rollout as rollout

    pol = load_policy(str(tiny_llama_dir))
    made = []
    orig = rollout.grouped_decoder

    def spy(*a, **k):
        made.append(orig(*a, **k))
        return made[-1]

    rollout.grouped_decoder = spy
    try:
        grouped = _rollout(pol, PROMPTS * 2, max_new_tokens=16)
        rollout.grouped_decoder = lambda *a, **k: None  # the per-row cache path
        per_row = _rollout(pol, PROMPTS * 2, max_new_tokens=16)
    finally:
        rollout.grouped_decoder = orig
    assert len(made) == 1 and isinstance(made[0], fastdecode.GroupedDecoder) and (made[0].u, made[0].g) == (4, 2)
    assert torch.equal(grouped.completion_ids, per_row.completion_ids)
    assert torch.equal(grouped.completion_mask, per_row.completion_mask)
    torch.testing.assert_close(grouped.logprobs, per_row.logprobs, atol=1e-6, rtol=0)


def test_decoder_rotation_table_equals_rotary_module(tiny_llama_dir):
    """The lean decoder's rotation table (built once) gives the e^{i p theta} the model's rotary
    module gives per step, and a decoder without the table (rope types whose frequencies depend on
    the length) steps to the same logits."""
    from tilt.fastdecode import _pairs, lean_decoder, qkv_rows
    from tilt.rollout import preallocated_cache

    # d = 4: rotate-half partners (0, 2) and (1, 3) side by side -> 0 2 1 3; with 1 query and 1 key
    # head the key head's rows start at 4 (4 + 0 2 1 3), and the value rows 8..11 keep their order
    assert _pairs(4).tolist() == [0, 2, 1, 3]
    assert qkv_rows(1, 1, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7, 8, 9, 10, 11]
    pol = load_policy(str(tiny_llama_dir))
    ids, mask = encode_prompts(pol.tokenizer, PROMPTS)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    for positions in (0, ids.shape[1] + 4):
        cache = preallocated_cache(pol.model, ids.shape[1] + 4)
        with torch.no_grad():
            pol.model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kw(pol.model, cache),
                      use_cache=True)
        dec = lean_decoder(pol.model, cache, positions=positions)
        assert (dec.table is None) == (positions == 0)
        step_pos = pos[:, -1] + 1
        if positions:
            h = torch.zeros(len(PROMPTS), 1)
            cos, sin = pol.model.model.rotary_emb(h, step_pos[:, None])
            half = cos.shape[-1] // 2
            torch.testing.assert_close(dec.rotation(h, step_pos)[:, 0],
                                       torch.complex(cos[:, 0, :half], sin[:, 0, :half]), atol=0, rtol=0)
        attn = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=mask.dtype)], 1)
        logits.append(dec.step(torch.full((len(PROMPTS),), 5), step_pos, attn))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_grouped_decoder_prefill_equals_hf_prefill(tiny_llama_dir, monkeypatch, fused):
    """The grouped decoder's own prefill of left-padded prompts gives HF's last-position logits and
    the keys (in the decoder's pair layout) and values of HF's cache, to float rounding; with the
    fused kernels (tilt.kernels) and with torch ops only."""
    import tilt.fastdecode as fastdecode
    from tilt.fastdecode import grouped_decoder
    from tilt.rollout import preallocated_cache, unique_prompts

    if not fused:
        monkeypatch.setattr(fastdecode.kernels, "usable", lambda *tensors: False)

    pol = load_policy(str(tiny_llama_dir))
    ids, mask = encode_prompts(pol.tokenizer, PROMPTS * 3)
    u_ids, u_mask, inverse = unique_prompts(ids, mask)
    assert bool((u_mask == 0).any())  # left padding is exercised
    dec = grouped_decoder(pol.model, None, u_mask, inverse, 4, positions=ids.shape[1] + 4)
    assert dec.fused == fused
    lean = dec.prefill(u_ids, u_mask)
    cache = preallocated_cache(pol.model, ids.shape[1])
    with torch.no_grad():
        out = pol.model(input_ids=u_ids, attention_mask=u_mask, position_ids=(u_mask.cumsum(-1) - 1).clamp(min=0),
                        **cache_kw(pol.model, cache), use_cache=True)
    torch.testing.assert_close(lean, out.logits[:, -1], atol=1e-5, rtol=1e-5)
    real = u_mask.bool()[:, None, :, None]  # padding keys are masked out, so only real ones must agree
    for i, layer in enumerate(cache.layers):
        keys = dec.prompt_keys(i)  # [U, nkv, P, d] in pair layout
        torch.testing.assert_close(keys * real, layer.keys.index_select(-1, dec.pair) * real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dec.vp[i] * real, layer.values * real, atol=1e-5, rtol=1e-5)


def test_grouped_decoder_needs_equal_groups(tiny_llama_dir):
    """Rows a a a b (3 and 1 samples) keep the per-row cache: no GroupedDecoder is built."""
    import tilt.rollout as rollout

    pol = load_policy(str(tiny_llama_dir))
    calls = []
    orig = rollout.grouped_decoder
    rollout.grouped_decoder = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        b = _rollout(pol, [PROMPTS[0]] * 3 + [PROMPTS[1]])
    finally:
        rollout.grouped_decoder = orig
    assert calls == [] and b.completion_ids.shape[0] == 4


def test_inverse_cdf_sampling_draws_the_distribution():
    """From CDF_SAMPLING_MIN_VOCAB tokens on, draws are by inverse CDF: over 20,000 rows the token
    frequencies match the probabilities (within 5 standard errors), zero-probability tokens never
    appear, and the same seed gives the same tokens; below it, torch.multinomial's draws are kept."""
    import tilt.rollout as rollout

    v = rollout.CDF_SAMPLING_MIN_VOCAB
    g = torch.Generator().manual_seed(0)
    probs = torch.zeros(v)
    probs[[3, 10, 500, v - 2]] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    probs = probs * 3.0  # unnormalised, as _pick passes them after a ban
    n = 20_000
    tok = rollout._multinomial(probs.expand(n, v), g)
    counts = torch.bincount(tok, minlength=v).double() / n
    assert set(torch.nonzero(counts).flatten().tolist()) <= {3, 10, 500, v - 2}
    target = (probs / probs.sum()).double()
    se = (target * (1 - target) / n).sqrt()
    assert bool(((counts - target).abs() <= 5 * se + 1e-12).all())
    again = rollout._multinomial(probs.expand(n, v), torch.Generator().manual_seed(0))
    assert torch.equal(tok, again)
    small = torch.tensor([[0.2, 0.0, 0.8]]).expand(50, 3)
    a = rollout._multinomial(small, torch.Generator().manual_seed(1))
    b = torch.multinomial(small, 1, generator=torch.Generator().manual_seed(1)).squeeze(-1)
    assert torch.equal(a, b)


def test_inverse_cdf_sampling_never_takes_a_massless_token_on_rounding(monkeypatch):
    """If u * total rounds up to the total, the draw falls back to the row's last token with mass."""
    import tilt.rollout as rollout

    v = rollout.CDF_SAMPLING_MIN_VOCAB
    probs = torch.zeros(2, v)
    probs[:, 7] = 1.0  # the last token with mass; everything after it is 0 (e.g. a banned EOS)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(2, 1))  # u = 1: u * total == total
    assert rollout._multinomial(probs, torch.Generator().manual_seed(0)).tolist() == [7, 7]


def test_left_pad_and_masked_rows_equal_per_row_tensor_code():
    """``left_pad`` (lists converted once) and ``masked_rows`` give what the per-row tensor code they
    replaced gave, on ragged rows including empty ones; and they invert each other."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (int(n),), generator=g).tolist() for n in torch.randint(0, 9, (40,), generator=g)]
    seqs[3] = []
    ids, mask = left_pad(seqs, pad_id=99)
    width = max(len(s) for s in seqs)
    want_ids = torch.full((len(seqs), width), 99, dtype=torch.long)
    want_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            want_ids[i, width - len(s):] = torch.tensor(s)
            want_mask[i, width - len(s):] = 1
    assert ids.dtype == mask.dtype == torch.long and torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert masked_rows(ids, mask) == [row[m.bool()].tolist() for row, m in zip(ids, mask)] == seqs
    right = torch.randint(0, 50, (6, 5), generator=g)
    right_mask = (torch.arange(5)[None] < torch.tensor([0, 1, 5, 3, 2, 4])[:, None]).long()
    assert masked_rows(right, right_mask) == [r[m.bool()].tolist() for r, m in zip(right, right_mask)]
    assert left_pad([[], []], 0)[0].shape == (2, 0)


@pytest.mark.parametrize("c_products", [False, True])
def test_packed_decode_products_equal_f_linear(tiny_llama_dir, monkeypatch, c_products):
    """Speed work 28 and 39: the decode step's products packed by ``_packed``, through MKL's packed GEMM
    or through tilt.kernels' ``linear`` (``C_PRODUCTS``), give the tokens and log-probs of ``F.linear``
    (1e-6), on the grouped path (groups of 4) and the per-row path (distinct prompts); a packed product
    called with another row count, or a strided input, computes F.linear."""
    import platform

    import torch.nn.functional as F

    import tilt.fastdecode as fd
    from tilt import kernels

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert fd.MKL_PACKING  # torch's x86 CPU wheels carry MKL: the fast path must be taken there
    if c_products:
        assert kernels.library() is not None, kernels.status()  # the test machines have a C compiler
    monkeypatch.setattr(fd, "C_PRODUCTS", c_products)
    monkeypatch.setattr(fd, "PACK_MIN_WEIGHT", 0)  # the test model's products are all small
    made = []
    orig = fd._packed
    def packed(wb, rows, swiglu=False):
        out = orig(wb, rows, swiglu)
        made.append(out[3] if len(out) == 4 else None)  # rows packed for (0 / -1: tilt.kernels') or None
        return out

    monkeypatch.setattr(fd, "_packed", packed)
    pol = load_policy(str(tiny_llama_dir))
    for prompts in (PROMPTS * 4, PROMPTS):
        out = {}
        for pack in (True, False):
            monkeypatch.setattr(fd, "MKL_PACKING", pack and fd.MKL_PACKING)
            monkeypatch.setattr(fd, "C_PRODUCTS", pack and c_products)
            made.clear()
            out[pack] = _rollout(pol, prompts, max_new_tokens=16, min_new_tokens=16)
            assert made and all((k is not None) == (pack and (fd.MKL_PACKING or c_products)) for k in made)
            if pack and c_products:  # grouped rows run the fused step: the gate/up products in linear_swiglu's layout
                assert set(made) == ({0, -1} if len(prompts) > len(PROMPTS) else {0}), set(made)
        assert torch.equal(out[True].completion_ids, out[False].completion_ids)
        torch.testing.assert_close(out[True].logprobs, out[False].logprobs, atol=1e-6, rtol=0)
    monkeypatch.setattr(fd, "MKL_PACKING", fd._mkl_packing_works())
    monkeypatch.setattr(fd, "C_PRODUCTS", c_products)
    w, b = torch.randn(1024, 256), torch.randn(1024)
    prod = orig((w, b), 64)
    assert prod[3] == (0 if c_products else 64)
    for x in (torch.randn(64, 256), torch.randn(7, 256), torch.randn(256, 64).t()):  # packed rows, others, strided
        exact = F.linear(x.double(), w.double(), b.double())  # sums of 256 products of size ~1: up to ~40
        assert (fd._lin(x, prod).double() - exact).abs().max() < 1e-4  # ~10 float ulps at 40; F.linear: 4e-5
        assert (F.linear(x, w, b).double() - exact).abs().max() < 1e-4
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    fd._mkl_packing_works()  # the import-time probe leaves the global RNG where it was
    assert torch.equal(torch.rand(4), expected)
