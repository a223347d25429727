"""tilt.fastforward: the lean teacher-forced pass equals Hugging Face's forward (values and gradients),
is used where it applies, and leaves other models on Hugging Face's forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tilt.fastdecode as fastdecode
import tilt.rollout as rollout
from tilt.fastforward import forward_supported
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate, sequence_logprobs

from test_kernels import needs_lib

PROMPTS = ["47+85=", "cd 3 5 7>22:", "sort 53 7 21:", "9*9="]


def _batch(pol, rows):
    ids, mask = encode_prompts(pol.tokenizer, rows)
    return generate(pol.model, ids, mask, params=SamplingParams(10), eos_id=pol.eos_id, pad_id=pol.pad_id,
                    generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("max_keys", [fastdecode.MATMUL_ATTENTION_MAX_KEYS, 0], ids=["matmul-attention", "sdpa"])
def test_lean_pass_is_used_and_equals_hf_for_distinct_and_shared_prompts(tiny_llama_dir, monkeypatch, max_keys):
    """Shared prompts (G = 3) and distinct prompts, some completions ended early by EOS: the lean pass
    runs (spied) and its log-probs equal Hugging Face's path to 1e-5, with and without grad; with the
    short-sequence attention of the lean paths (these sequences are short) and with SDPA for all."""
    monkeypatch.setattr(fastdecode, "MATMUL_ATTENTION_MAX_KEYS", max_keys)
    pol = load_policy(str(tiny_llama_dir))
    assert forward_supported(pol.model)
    calls = []
    orig = rollout.shared_completion_states
    monkeypatch.setattr(rollout, "shared_completion_states", lambda *a, **k: calls.append(1) or orig(*a, **k))
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


def _lora_policy(tiny_llama_dir):
    """The tiny Llama with LoRA on every projection, B set to non-zero values so the adapters matter."""
    import peft

    from tilt.config import LoraCfg
    from tilt.models.lora import apply_lora

    pol = load_policy(str(tiny_llama_dir))
    pol.model = apply_lora(pol.model, LoraCfg(enabled=True, r=4, lora_alpha=8, target_modules="all-linear"), where="t")
    assert isinstance(pol.model, peft.PeftModel)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pol


def test_lean_paths_run_lora_policies_and_their_reference(tiny_llama_dir, monkeypatch):
    """A LoRA policy samples through the lean decoder (adapters merged) and trains through the lean pass
    (adapters beside the base matmuls): same tokens, log-probs to 1e-5 and LoRA gradients to 1e-5 as
    peft's own forward; the adapter-disabled reference equals the base model bit for bit."""
    import pytest

    pytest.importorskip("peft")
    from tilt.fastdecode import lean_supported
    from tilt.models.lora import AdapterDisabledRef

    pol = _lora_policy(tiny_llama_dir)
    ref = AdapterDisabledRef(pol.model)
    assert lean_supported(pol.model) and forward_supported(pol.model) and forward_supported(ref)
    rows = [p for p in PROMPTS for _ in range(2)]
    ids, mask = encode_prompts(pol.tokenizer, rows)

    def sample(lean):
        return generate(pol.model, ids, mask, params=SamplingParams(10, lean=lean), eos_id=pol.eos_id,
                        pad_id=pol.pad_id, generator=torch.Generator().manual_seed(0))

    fast, slow = sample(True), sample(False)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    cm = fast.completion_mask

    def fwd_bwd(model, lean):
        monkeypatch.setattr(rollout, "forward_supported", forward_supported if lean else (lambda m: False))
        pol.model.zero_grad(set_to_none=True)
        lp, _ = sequence_logprobs(model, ids, mask, fast.completion_ids, cm)
        if lp.requires_grad:
            (lp * cm).sum().backward()
        grads = {n: p.grad.clone() for n, p in pol.model.named_parameters() if p.grad is not None}
        return (lp * cm).detach(), grads

    (lf, gf), (ls, gs) = fwd_bwd(pol.model, True), fwd_bwd(pol.model, False)
    torch.testing.assert_close(lf, ls, atol=1e-5, rtol=0)
    torch.testing.assert_close(lf, fast.logprobs, atol=1e-5, rtol=0)
    assert gf.keys() == gs.keys() and gf and all("lora_" in n for n in gf)
    for n in gf:
        torch.testing.assert_close(gf[n], gs[n], atol=1e-5, rtol=1e-4, msg=n)
    base = load_policy(str(tiny_llama_dir)).model
    with torch.no_grad():
        r_fast, _ = fwd_bwd(ref, True)
        r_base, _ = fwd_bwd(base, True)
        r_slow, _ = fwd_bwd(ref, False)
    assert torch.equal(r_fast, r_base)
    torch.testing.assert_close(r_fast, r_slow, atol=1e-5, rtol=0)
    assert (r_fast - lf).abs().max() > 1e-3  # the adapters change the policy


def test_lean_pass_lora_on_some_projections(tiny_llama_dir, monkeypatch):
    """LoRA on q, v and up only: the stacked q/k/v and gate/up products get adapters on some of their
    projections (zero blocks elsewhere); log-probs and LoRA gradients equal peft's forward."""
    import pytest

    pytest.importorskip("peft")
    from tilt.config import LoraCfg
    from tilt.models.lora import apply_lora

    pol = load_policy(str(tiny_llama_dir))
    pol.model = apply_lora(pol.model, LoraCfg(enabled=True, r=3, lora_alpha=5,
                                              target_modules=["q_proj", "v_proj", "up_proj"]), where="t")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    rows = [p for p in PROMPTS for _ in range(2)]
    b = _batch(pol, rows)
    cm = b.completion_mask

    def fwd_bwd(lean):
        monkeypatch.setattr(rollout, "forward_supported", forward_supported if lean else (lambda m: False))
        pol.model.zero_grad(set_to_none=True)
        lp, _ = sequence_logprobs(pol.model, b.prompt_ids, b.prompt_mask, b.completion_ids, cm)
        (lp * cm).sum().backward()
        return (lp * cm).detach(), {n: p.grad.clone() for n, p in pol.model.named_parameters() if p.grad is not None}

    (lf, gf), (ls, gs) = fwd_bwd(True), fwd_bwd(False)
    torch.testing.assert_close(lf, ls, atol=1e-5, rtol=0)
    assert gf.keys() == gs.keys() and len(gf) == 2 * 3 * 2  # A and B of 3 projections in each of 2 layers
    for n in gf:
        torch.testing.assert_close(gf[n], gs[n], atol=1e-5, rtol=1e-4, msg=n)


def test_frozen_stacked_weights_follow_in_place_updates(tiny_llama_dir, monkeypatch):
    """A frozen model's (requires_grad off: a reference, a LoRA policy's base) stacked q/k/v and gate/up
    weights are kept between calls; writing a weight in place (load_state_dict, an EMA update) makes the
    next pass stack them again."""
    pol = load_policy(str(tiny_llama_dir))
    pol.model.requires_grad_(False)
    b = _batch(pol, PROMPTS)
    args = (b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)

    def both():
        with torch.no_grad():
            fast, _ = sequence_logprobs(pol.model, *args)
            monkeypatch.setattr(rollout, "forward_supported", lambda m: False)
            slow, _ = sequence_logprobs(pol.model, *args)
            monkeypatch.setattr(rollout, "forward_supported", forward_supported)
        return fast * b.completion_mask, slow * b.completion_mask

    before, slow = both()
    torch.testing.assert_close(before, slow, atol=1e-5, rtol=0)
    layer = pol.model.model.layers[0]
    assert "_tilt_stacked" in layer.self_attn.q_proj.__dict__ and "_tilt_stacked" in layer.mlp.gate_proj.__dict__
    with torch.no_grad():
        layer.self_attn.k_proj.weight.mul_(1.5)
        layer.mlp.up_proj.weight.add_(0.01)
    after, slow = both()
    torch.testing.assert_close(after, slow, atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 1e-3


def test_no_grad_pass_of_a_trainable_policy_sees_a_fused_optimizer_step(tiny_llama_dir, monkeypatch):
    """A no-grad pass over trainable weights (the learner-log-prob pass of a correction) keeps no stack: a fused
    AdamW step writes the weights without bumping their ``_version``, and the next pass must see the new
    weights (it saw the old ones before: log pi_old from before the last update)."""
    pol = load_policy(str(tiny_llama_dir))
    b = _batch(pol, PROMPTS)
    args = (b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    with torch.no_grad():
        before, _ = sequence_logprobs(pol.model, *args)
    layer = pol.model.model.layers[0]
    assert "_tilt_stacked" not in layer.self_attn.q_proj.__dict__
    versions = [p._version for p in pol.model.parameters()]
    opt = torch.optim.AdamW(pol.model.parameters(), lr=0.05, fused=True)
    for p in pol.model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert [p._version for p in pol.model.parameters()] == versions  # the weights moved, their versions did not
    with torch.no_grad():
        after, _ = sequence_logprobs(pol.model, *args)
        monkeypatch.setattr(rollout, "forward_supported", lambda m: False)
        hf, _ = sequence_logprobs(pol.model, *args)  # Hugging Face's forward
    m = b.completion_mask
    torch.testing.assert_close(after * m, hf * m, atol=1e-5, rtol=0)
    assert ((after - before) * m).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("per_row_mask", [True, False])
def test_matmul_attention_equals_sdpa(dtype, tol, nq, nkv, per_row_mask, monkeypatch):
    """The short-sequence attention (plain products, grouped-query heads broadcast) against SDPA with
    the keys repeated per query head: outputs and the gradients of q, k and v. The mask is causal over
    the completion and hides some prompt keys per row (left padding); every query sees a key."""
    g = torch.Generator().manual_seed(0)
    b, length, prompt, d = 3, 5, 7, 8
    q = torch.randn(b, nq, length, d, dtype=dtype, generator=g)
    k = torch.randn(b, nkv, prompt + length, d, dtype=dtype, generator=g)
    v = torch.randn(b, nkv, prompt + length, d, dtype=dtype, generator=g)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    to_prompt = torch.ones(b if per_row_mask else 1, length, prompt, dtype=torch.bool)
    if per_row_mask:
        to_prompt[1, :, :3] = False  # row 1's prompt has 3 padding keys
        to_prompt[2, :, :6] = False
    mask = torch.cat([to_prompt, causal.expand(to_prompt.shape[0], length, length)], -1)[:, None]  # [B|1, 1, L, S]
    grads = []
    for fn in (lambda *a: fastdecode._matmul_attention(*a, 0.3),
               lambda q, k, v, m: F.scaled_dot_product_attention(q, k.repeat_interleave(nq // nkv, 1),
                                                                 v.repeat_interleave(nq // nkv, 1), attn_mask=m,
                                                                 scale=0.3)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, mask)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append([out.detach()] + [x.grad for x in leaves])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, atol=tol, rtol=0)
    calls = []  # attention() takes this path at 12 keys and SDPA above the threshold
    monkeypatch.setattr(fastdecode, "_matmul_attention", lambda *a: calls.append(1) or grads[0][0])
    fastdecode.attention(q, k, v, mask, 0.3)
    monkeypatch.setattr(fastdecode, "MATMUL_ATTENTION_MAX_KEYS", prompt + length - 1)
    torch.testing.assert_close(fastdecode.attention(q, k, v, mask, 0.3), grads[1][0], atol=tol, rtol=0)
    assert calls == [1]


def test_matmul_attention_hand_values():
    """One query over two keys, worked by hand. q = [1, 0], keys [1, 0] and [0, 1], values 2 and 4,
    scale 1: scores [1, 0], softmax [e / (e + 1), 1 / (e + 1)] = [0.731059, 0.268941], output
    2 * 0.731059 + 4 * 0.268941 = 2.537883. With the second key masked the output is its value, 2."""
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    v = torch.tensor([[2.0, 2.0], [4.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    both = torch.tensor([True, True]).view(1, 1, 1, 2)
    first = torch.tensor([True, False]).view(1, 1, 1, 2)
    e = 2.718281828459045
    expected = 2 * e / (e + 1) + 4 / (e + 1)  # 2.537883...
    assert abs(expected - 2.537883) < 1e-6
    torch.testing.assert_close(fastdecode._matmul_attention(q, k, v, both, 1.0), torch.full((1, 1, 1, 2), expected,
                                                                                          dtype=torch.float64))
    torch.testing.assert_close(fastdecode._matmul_attention(q, k, v, first, 1.0), torch.full((1, 1, 1, 2), 2.0,
                                                                                           dtype=torch.float64))


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "torch-ops"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("weight", ["trained", "frozen", "none"])
def test_rms_norm_function_equals_f_rms_norm(dtype, tol, weight, fused, monkeypatch):
    """tilt.fastforward.RMSNorm (hand-written backward; in float32 tilt.kernels' C kernels where they
    load) against autograd through F.rms_norm: output, d/dx and d/dw for a 3-D input, a trained, a
    frozen and no weight. The upstream gradient is not constant, so the (g . x) term of dx matters."""
    import tilt.fastforward as fastforward
    from tilt.fastforward import rms_norm

    monkeypatch.setattr(fastforward, "FUSED", fused)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, generator=g) * 3
    w = None if weight == "none" else (torch.rand(16, dtype=dtype, generator=g) + 0.5)
    up = torch.randn(3, 5, 16, dtype=dtype, generator=g)
    results = []
    for fn in (lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm(x, (16,), w, 1e-5)):
        xl = x.clone().requires_grad_()
        wl = None if w is None else w.clone().requires_grad_(weight == "trained")
        out = fn(xl, wl)
        (out * up).sum().backward()
        results.append((out.detach(), xl.grad, None if wl is None else wl.grad))
    (out, dx, dw), (ref_out, ref_dx, ref_dw) = results
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=tol, rtol=0)
    if weight == "trained":
        torch.testing.assert_close(dw, ref_dw, atol=tol * 10, rtol=0)  # a sum over 15 positions
    else:
        assert dw is None and ref_dw is None
    assert dx.abs().max() > 0.1  # the check compares real gradients


def test_rms_norm_function_hand_values():
    """x = [3, 4], w = [1, 2], eps = 0: r = 1 / sqrt((9 + 16) / 2) = 0.282843, y = [0.848528, 2.262742].
    With dy = [1, 0]: g = dy w = [1, 0], g . x = 3, dx = r g - x r^3 3 / 2 = [0.282843 - 3 * 0.033941,
    -4 * 0.033941] = [0.181019, -0.135765] (r^3 3 / 2 = 0.033941); dw = dy x r = [0.848528, 0]."""
    from tilt.fastforward import rms_norm

    x = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = rms_norm(x, w, 0.0)
    torch.testing.assert_close(y.detach(), torch.tensor([0.848528, 2.262742], dtype=torch.float64), atol=1e-6, rtol=0)
    y[0].backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.181019, -0.135765], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.grad, torch.tensor([0.848528, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_swiglu_function_equals_the_plain_expression_bit_for_bit(monkeypatch):
    """tilt.fastforward.SwiGLU's torch path against autograd through chunk / silu / mul: the same
    operators on the same values, so the output and the gradient of the fused [gate, up] tensor are
    bit-equal. (Its C path, tilt.kernels: tests/test_kernels.py.)"""
    import tilt.fastforward as fastforward
    from tilt.fastforward import SwiGLU

    monkeypatch.setattr(fastforward, "FUSED", False)

    g = torch.Generator().manual_seed(0)
    gu = torch.randn(2, 7, 24, generator=g) * 4
    up = torch.randn(2, 7, 12, generator=g)
    results = []
    for fn in (SwiGLU.apply, lambda z: F.silu(z.chunk(2, -1)[0]) * z.chunk(2, -1)[1]):
        z = gu.clone().requires_grad_()
        out = fn(z)
        (out * up).sum().backward()
        results.append((out.detach(), z.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][1][..., :12].abs().max() > 0.1 and results[0][1][..., 12:].abs().max() > 0.1


def test_no_grad_pass_updates_its_residual_in_place_with_the_same_values(tiny_llama_dir, monkeypatch):
    """Without autograd the lean pass adds each product into the residual stream in place and writes SwiGLU into
    the gate half of its input (``INTO_ADD``, speed work 49): the log-probs equal those of the pass with new outputs
    and of the grad-enabled pass bit for bit, and the in-place calls ran."""
    import tilt.fastforward as fastforward
    import tilt.kernels as kernels

    pol = load_policy(str(tiny_llama_dir))
    rows = [p for p in PROMPTS for _ in range(3)]
    ids, mask = encode_prompts(pol.tokenizer, rows)
    out = generate(pol.model, ids, mask, params=SamplingParams(9), eos_id=pol.eos_id, pad_id=pol.pad_id,
                   generator=torch.Generator().manual_seed(0))
    args = (pol.model, ids, mask, out.completion_ids, out.completion_mask)
    gates = []
    monkeypatch.setattr(fastforward, "swiglu_into", lambda gu, _f=fastforward.swiglu_into: gates.append(1) or _f(gu))
    with torch.no_grad():
        into = sequence_logprobs(*args)[0]
        assert len(gates) == (pol.model.config.num_hidden_layers if kernels.library() is not None else 0)
        monkeypatch.setattr(fastforward, "INTO_ADD", False)
        fresh = sequence_logprobs(*args)[0]
    graded = sequence_logprobs(*args)[0]
    assert graded.requires_grad and torch.equal(into, fresh) and torch.equal(into, graded.detach())


@needs_lib
def test_silu_mul_gate_writes_the_gate_half_only():
    """``kernels.silu_mul_gate``: silu(g) * u into the gate half (a row width with a 16-lane tail), the up half
    unchanged, the same values as ``silu_mul``; a non-contiguous input is refused."""
    import tilt.kernels as kernels

    gu = torch.randn(5, 2 * 21, generator=torch.Generator().manual_seed(3)) * 3
    orig, want = gu.clone(), kernels.silu_mul(gu)
    got = kernels.silu_mul_gate(gu)
    assert got.data_ptr() == gu.data_ptr() and torch.equal(got, want) and torch.equal(gu[:, 21:], orig[:, 21:])
    torch.testing.assert_close(got, F.silu(orig[:, :21]) * orig[:, 21:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.silu_mul_gate(torch.randn(8, 5).t())


def test_swiglu_backward_into_its_input_gives_the_same_gradients(tiny_llama_dir, monkeypatch):
    """SwiGLU's kernel backward writes the gate/up gradient over its saved input (``GRAD_INTO_INPUT``, which nothing
    else reads): the policy's gradients equal those with a new buffer bit for bit."""
    import tilt.fastforward as fastforward

    pol = load_policy(str(tiny_llama_dir))
    ids, mask = encode_prompts(pol.tokenizer, [p for p in PROMPTS for _ in range(2)])
    out = generate(pol.model, ids, mask, params=SamplingParams(7), eos_id=pol.eos_id, pad_id=pol.pad_id,
                   generator=torch.Generator().manual_seed(1))
    grads = []
    for into in (True, False):
        monkeypatch.setattr(fastforward, "GRAD_INTO_INPUT", into)
        pol.model.zero_grad(set_to_none=True)
        lp = sequence_logprobs(pol.model, ids, mask, out.completion_ids, out.completion_mask)[0]
        (lp * out.completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in pol.model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert any(float(g.abs().max()) > 0 for n, g in grads[0].items() if "mlp" in n)


def test_second_backward_through_the_lean_pass_is_a_clear_error(tiny_llama_dir):
    """The lean pass frees and reuses its buffers in the backward, so a second backward through the same graph
    (retain_graph=True) is refused with an error that says so, not a TypeError from inside."""
    pol = load_policy(str(tiny_llama_dir))
    ids, mask = encode_prompts(pol.tokenizer, PROMPTS[:2])
    out = generate(pol.model, ids, mask, params=SamplingParams(5), eos_id=pol.eos_id, pad_id=pol.pad_id,
                   generator=torch.Generator().manual_seed(0))
    lp = sequence_logprobs(pol.model, ids, mask, out.completion_ids, out.completion_mask)[0]
    loss = (lp * out.completion_mask).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@needs_lib
def test_swiglu_kernel_backward_into_its_input_bumps_its_version(monkeypatch):
    """The kernel backward over its input: the gradient equals the one into a new buffer bit for bit (a width with a
    16-lane tail), and the overwritten input's version moves on, so autograd refuses any later read of it."""
    import tilt.fastforward as fastforward
    from tilt.fastforward import SwiGLU

    base = (torch.randn(6, 2 * 19, generator=torch.Generator().manual_seed(2)) * 3).requires_grad_()
    dy = torch.randn(6, 19, generator=torch.Generator().manual_seed(3))
    got = []
    for into in (True, False):
        monkeypatch.setattr(fastforward, "GRAD_INTO_INPUT", into)
        base.grad = None
        gu = base * 1.0
        SwiGLU.apply(gu).backward(dy)
        got.append((base.grad.clone(), gu._version))
    assert torch.equal(got[0][0], got[1][0]) and got[0][1] == got[1][1] + 1
