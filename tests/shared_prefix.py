"""Check used by test_rollout.py and test_hf_models.py: the shared-prompt forward (Hugging Face's two
calls, and tilt.fastforward's lean pass where the model is of its kinds) equals one plain forward
over [prompt, completion] per row, in values and in gradients."""
from __future__ import annotations

import torch

from tilt.rollout import SamplingParams, completion_logits, encode_prompts, generate


def assert_shared_prefix_forward_is_exact(pol, prompts: list[str], group: int = 4) -> None:
    rows = [p for p in prompts for _ in range(group)]
    ids, mask = encode_prompts(pol.tokenizer, rows)
    b = generate(pol.model, ids, mask, params=SamplingParams(9), eos_id=pol.eos_id, pad_id=pol.pad_id,
                 generator=torch.Generator().manual_seed(0))
    cmask = b.completion_mask.float()
    pol.model.eval()  # dropout off (GPT-2 has it), so the two passes are comparable

    def run(shared: bool):
        pol.model.zero_grad()
        if shared:
            logits, hid = completion_logits(pol.model, ids, mask, b.completion_ids, b.completion_mask, hidden=True)
        else:  # the reference: one forward over the whole sequence of each row
            full = torch.cat([mask, b.completion_mask], 1)
            out = pol.model(input_ids=torch.cat([ids, b.completion_ids], 1), attention_mask=full,
                            position_ids=(full.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
            p = ids.shape[1]
            logits, hid = out.logits[:, p - 1:-1], out.hidden_states[-1][:, p - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, b.completion_ids[..., None]).squeeze(-1)
        ((logp * cmask).sum() + (hid.pow(2).mean(-1) * cmask).sum()).backward()
        grads = [q.grad.clone() for q in pol.model.parameters() if q.grad is not None]
        return logits.detach() * cmask[..., None], hid.detach() * cmask[..., None], grads

    (l1, h1, g1), (l0, h0, g0) = run(True), run(False)
    assert len(g1) == len(g0) > 0
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)

    def logits_only(lean: bool):  # without hidden states: the learner's and the reference's pass
        pol.model.zero_grad()
        logits, _ = completion_logits(pol.model, ids, mask, b.completion_ids, b.completion_mask, lean=lean)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, b.completion_ids[..., None]).squeeze(-1)
        (logp * cmask).sum().backward()
        return logits.detach() * cmask[..., None], [q.grad.clone() for q in pol.model.parameters() if q.grad is not None]

    (lf, gf), (ls, gs) = logits_only(True), logits_only(False)
    assert len(gf) == len(gs) > 0
    torch.testing.assert_close(lf, l0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lf, ls, atol=1e-5, rtol=1e-5)
    for a, c in zip(gf, gs):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
