"""tilt.fastforward: the lean teacher-forced pass equals Hugging Face's forward (values and gradients),
is used where it applies, and leaves other models on Hugging Face's forward."""
from __future__ import annotations

import torch

import tilt.rollout as rollout
from tilt.fastforward import forward_supported
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate, sequence_logprobs

PROMPTS = ["47+85=", "cd 3 5 7>22:", "sort 53 7 21:", "9*9="]


def _batch(pol, rows):
    ids, mask = encode_prompts(pol.tokenizer, rows)
    return generate(pol.model, ids, mask, params=SamplingParams(10), eos_id=pol.eos_id, pad_id=pol.pad_id,
                    generator=torch.Generator().manual_seed(0))


def test_lean_pass_is_used_and_equals_hf_for_distinct_and_shared_prompts(tiny_llama_dir, monkeypatch):
    """Shared prompts (G = 3) and distinct prompts, some completions ended early by EOS: the lean pass
    runs (spied) and its log-probs equal Hugging Face's path to 1e-5, with and without grad."""
    pol = load_policy(str(tiny_llama_dir))
    assert forward_supported(pol.model)
    calls = []
    orig = rollout.shared_completion_logits
    monkeypatch.setattr(rollout, "shared_completion_logits", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for rows in ([p for p in PROMPTS for _ in range(3)], PROMPTS):
        b = _batch(pol, rows)
        with torch.no_grad():
            fast, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
            monkeypatch.setattr(rollout, "forward_supported", lambda m: False)
            slow, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
            monkeypatch.setattr(rollout, "forward_supported", forward_supported)
        torch.testing.assert_close(fast * b.completion_mask, slow * b.completion_mask, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast * b.completion_mask, b.logprobs, atol=1e-5, rtol=0)
    assert len(calls) == 2


def test_lean_pass_skips_attention_dropout(tmp_path, char_tok):
    """A model with attention dropout keeps Hugging Face's forward (the lean pass has no dropout)."""
    from tilt.model import build_llama

    model = build_llama(len(char_tok), hidden=32, layers=1, heads=2, intermediate=64, seed=0)
    assert forward_supported(model)
    model.config.attention_dropout = 0.1
    assert not forward_supported(model)
