"""tilt.token_logprobs: log-probs, entropy and their gradients equal the plain log-softmax path."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import tilt.learner
import tilt.rollout
import tilt.token_logprobs as tl
from tilt.model import load_policy
from tilt.token_logprobs import head_token_logprobs, token_logprobs

from test_learner import _batch, _learner


def plain(logits, ids, temperature=1.0, entropy=False):
    """The path tilt used before: divide, log-softmax over V, gather; entropy from the full log-softmax."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z / temperature if temperature > 0 and temperature != 1.0 else z
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)


def both(fn, logits, ids, g_logp, g_ent, **kw):
    z = logits.clone().requires_grad_()
    logp, ent = fn(z, ids, **kw)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
    loss.backward()
    return logp.detach(), (ent.detach() if ent is not None else None), z.grad


# float64: 1e-9, not 1e-12: torch's own logsumexp with two threads differs by ~1e-10 from call to call
# on the first calls of a process (measured: 2 of 25 fresh processes, none with one thread)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_equals_plain_log_softmax(monkeypatch, dtype, tol, temperature, entropy):
    """Several blocks with a short last one (the block is forced to 3 positions), gradients through
    both outputs with random upstream gradients. In float32 both paths round differently (logits up to
    ~15 in size): each is within ~3e-6 of float64 (``test_float32_error_no_larger_than_plain``)."""
    monkeypatch.setattr(tl, "BLOCK_ELEMENTS", 3 * 1000)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 5, 1000, generator=gen, dtype=torch.float64) * 4).to(dtype)  # 20 positions
    ids = torch.randint(0, 1000, (4, 5), generator=gen)
    g_logp = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(dtype)
    g_ent = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(dtype)
    want = both(lambda z, y: plain(z, y, temperature, entropy), logits, ids, g_logp, g_ent)
    got = both(lambda z, y: token_logprobs(z, y, temperature=temperature, entropy=entropy), logits, ids,
               g_logp, g_ent)
    for w, g in zip(want, got):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_error_no_larger_than_plain(temperature):
    """Against the float64 answer, float32 log-probs and entropy are as accurate as the plain path's."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(8, 16, 2000, generator=gen, dtype=torch.float64) * 4
    ids = torch.randint(0, 2000, (8, 16), generator=gen)
    exact = plain(z, ids, temperature, True)
    old = plain(z.float(), ids, temperature, True)
    new = token_logprobs(z.float(), ids, temperature=temperature, entropy=True)
    for e, o, n in zip(exact, old, new):
        err_old, err_new = (o.double() - e).abs().max(), (n.double() - e).abs().max()
        assert err_new <= max(1.5 * err_old, 1e-6), (err_new, err_old)


def test_bfloat16_logits_are_worked_in_float32():
    """bf16 logits: float32 log-probs and entropy as the plain path's float32 log-softmax of them;
    the gradient is bf16 (the logits' dtype) and equal up to bf16 rounding."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, 300, generator=gen) * 3).bfloat16()
    ids = torch.randint(0, 300, (3, 7), generator=gen)
    g_logp, g_ent = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    want = both(lambda z, y: plain(z, y, 0.7, True), logits, ids, g_logp, g_ent)
    got = both(lambda z, y: token_logprobs(z, y, temperature=0.7, entropy=True), logits, ids, g_logp, g_ent)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[2].float(), want[2].float(), rtol=1e-2, atol=1e-4)


def test_hand_values():
    """Two tokens, logits (0, log 3): p = (1/4, 3/4); log p_1 = log 3/4; H = -(1/4 log 1/4 + 3/4 log 3/4);
    d log p_1 / dz = (0 - 1/4, 1 - 3/4)."""
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    logp, ent = token_logprobs(z, torch.tensor([1]), entropy=True)
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-12)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-12)
    logp.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.25, 0.25]], dtype=torch.float64))


def plain_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *,
                              temperature=1.0, entropy=False):
    """The learner's path before: the [N, T, V] logits (lean pass, LM head included), then ``plain``."""
    logits = tilt.rollout.completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)[0]
    return plain(logits, completion_ids, temperature, entropy)


@pytest.mark.parametrize("loss", ["dapo", "aer"])
def test_learner_loss_and_gradients_equal_plain_path(tiny_llama_dir, monkeypatch, loss):
    """A learner micro-batch at temperature 0.7 in float32, LM head inside ``head_token_logprobs``
    (spied): loss, metrics and every parameter's gradient (the LM head's included) equal the plain
    log-softmax path's to 1e-6 (aer's loss differentiates the entropy)."""
    pol = load_policy(str(tiny_llama_dir), dtype=torch.float32)
    batch = _batch(pol)
    calls = []
    orig = tilt.rollout.head_token_logprobs
    monkeypatch.setattr(tilt.rollout, "head_token_logprobs", lambda *a, **k: calls.append(1) or orig(*a, **k))
    runs = []
    for fn in (tilt.rollout.completion_token_logprobs, plain_completion_logprobs):
        model = copy.deepcopy(pol.model)
        learner = _learner(model, loss)
        learner.temperature = 0.7
        monkeypatch.setattr(tilt.learner, "completion_token_logprobs", fn)
        denominator = float(batch.completion_mask.sum())
        out, stats = learner.micro_loss(batch, denominator)
        out.backward()
        runs.append((out.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls == [1]
    (la, sa, ga), (lb, sb, gb) = runs
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    assert sa.keys() == sb.keys() and "entropy" in sa
    for k in sa:
        assert sa[k] == pytest.approx(sb[k], rel=1e-6, abs=1e-7), k
    head = [n for n, p in pol.model.named_parameters() if p is pol.model.get_output_embeddings().weight]
    assert head and ga[head[0]].abs().sum() > 0  # the LM head (tied to the embedding here) gets its gradient
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("bias", [False, True])
def test_head_inside_equals_head_outside(bias):
    """``head_token_logprobs`` equals ``token_logprobs`` of F.linear(states, W, b): values and the
    gradients of states, W and b (float64)."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(50, generator=gen, dtype=torch.float64) if bias else None
    ids = torch.randint(0, 50, (3, 4), generator=gen)
    g1, g2 = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    outs = []
    for inside in (True, False):
        leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
        bb = leaves[2] if bias else None
        if inside:
            lp, ent = head_token_logprobs(leaves[0], leaves[1], bb, ids, temperature=0.8, entropy=True)
        else:
            lp, ent = token_logprobs(torch.nn.functional.linear(leaves[0], leaves[1], bb), ids, temperature=0.8,
                                     entropy=True)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        outs.append([lp.detach(), ent.detach()] + [t.grad for t in leaves])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_head_workspace_taken_by_a_later_pass_is_recomputed():
    """Two passes before either backward (the second takes the shared logits buffer): the first one's
    backward recomputes its logits and both gradients equal separate passes'."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    ha, hb = (torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    ids = torch.randint(0, 40, (5,), generator=gen)

    def grads(h, first=None):
        x = h.clone().requires_grad_()
        lp, _ = head_token_logprobs(x, w, None, ids)
        return x, lp

    xa, la = grads(ha)
    xb, lb = grads(hb)  # takes the buffer: la's logits are overwritten
    la.sum().backward()
    lb.sum().backward()
    for h, x in ((ha, xa), (hb, xb)):
        y = h.clone().requires_grad_()
        token_logprobs(torch.nn.functional.linear(y, w), ids)[0].sum().backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)
