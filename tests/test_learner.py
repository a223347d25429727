"""Learner: k accumulated micro-batches equal one full batch; non-finite steps are skipped."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tilt.kl import KL_ESTIMATORS
from tilt.learner import Learner, LearnerBatch
from tilt.losses import LOSSES
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate


def _batch(pol, n_prompts=3, g=4) -> LearnerBatch:
    prompts = [p for p in ["47+85=", "cd 3 5 7>22:", "sort 5 3 1:"][:n_prompts] for _ in range(g)]
    ids, mask = encode_prompts(pol.tokenizer, prompts)
    rb = generate(pol.model, ids, mask, params=SamplingParams(10), eos_id=pol.eos_id, pad_id=pol.pad_id,
                  generator=torch.Generator().manual_seed(0))
    n, t = rb.completion_ids.shape
    adv = torch.randn(n, generator=torch.Generator().manual_seed(1))[:, None].expand(n, t).contiguous()
    return LearnerBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=rb.completion_ids,
                        completion_mask=rb.completion_mask, old_logp=rb.logprobs,
                        advantages=adv * rb.completion_mask, rewards=torch.zeros(n),
                        group_index=torch.arange(n_prompts).repeat_interleave(g), ref_logp=rb.logprobs - 0.1)


def _learner(model, loss="grpo", accum=1, lr=1e-2, **kw) -> Learner:
    entry = LOSSES.entry(loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Learner(model, opt, sched, loss_fn=entry.fn, loss_needs=tuple(entry.meta.get("needs", ())),
                   reduction=kw.get("reduction", entry.meta["reduction"]), max_len=10, temperature=1.0,
                   kl_fn=KL_ESTIMATORS.get("k3"), kl_beta=0.04, kl_in_loss=True, epochs=1,
                   minibatches=kw.get("minibatches", 1), grad_accum=accum, grad_clip=1e9,
                   generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo", "gspo"])
@pytest.mark.parametrize("accum", [2, 5])
def test_k_micro_batches_equal_one_full_batch(tiny_llama_dir, loss, accum):
    """The same optimizer step results from 1 full batch or k micro-batches (uneven split for k=5),
    because every micro-batch divides by the full mini-batch's denominator."""
    pol = load_policy(str(tiny_llama_dir), dtype=torch.float64)
    batch = _batch(pol)
    a, b = copy.deepcopy(pol.model), copy.deepcopy(pol.model)
    ma = _learner(a, loss, accum=1).update(batch)
    mb = _learner(b, loss, accum=accum).update(batch)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-9, abs=1e-12)
    moved = False
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), pol.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-10, rtol=0, msg=name)
        moved |= not torch.equal(pa, p0)
    assert moved, "the update must change the parameters"


def test_nonfinite_loss_step_is_skipped(tiny_llama_dir):
    pol = load_policy(str(tiny_llama_dir))
    batch = _batch(pol)
    batch.advantages[0, 0] = float("nan")
    before = copy.deepcopy(pol.model.state_dict())
    out = _learner(pol.model, "ppo_clip", minibatches=1).update(batch)
    assert out["train/skipped"] == 1 and out["train/bad_streak"] == 1
    for k, v in pol.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_token_budget_micro_batches_equal_one_full_batch(tiny_llama_dir):
    """``micro_batch_tokens`` only bounds memory: a budget that forces two rows per micro-batch
    gives the same update as no budget; ``micro_batches`` counts a prompt shared by a part's rows once."""
    pol = load_policy(str(tiny_llama_dir), dtype=torch.float64)
    batch = _batch(pol)
    p, t = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    a, b = copy.deepcopy(pol.model), copy.deepcopy(pol.model)
    la, lb = _learner(a, "dapo"), _learner(b, "dapo")
    rows = torch.arange(12)
    assert [c.tolist() for c in la.micro_batches(batch, rows)] == [list(range(12))]
    lb.micro_batch_tokens = p + 2 * t  # two rows of one prompt (its prompt once) fit, three do not
    assert [len(c) for c in lb.micro_batches(batch, rows)] == [2] * 6
    # a whole group of 4 rows costs p + 4t (its prompt once): one group per part, never a row of the next
    # (a fifth row would add the next prompt: 2 prompts + 5 completions > p + 4t)
    lc = _learner(copy.deepcopy(pol.model), "dapo")
    lc.micro_batch_tokens = p + 4 * t
    assert [c.tolist() for c in lc.micro_batches(batch, rows)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    ma, mb = la.update(batch), lb.update(batch)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-9, abs=1e-12)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-10, rtol=0, msg=name)
    assert mb["time/fwd_bwd_s"] > 0 and mb["time/optimizer_s"] > 0


def test_auto_micro_batch_tokens_scales_with_the_model(tmp_path, tiny_llama_dir, char_tok, monkeypatch):
    """train.micro_batch_tokens="auto" (the default) divides an activation budget (an eighth of the machine's
    memory, 2-8 GiB) by the model's estimated bytes per position: a wider, deeper model or a larger
    vocabulary gets fewer positions; the run's learner and reference pass get the resolved number; 0 and
    other strings are config errors."""
    from pydantic import ValidationError

    import tilt.rollout as rollout
    from tilt.config import load_config
    from tilt.model import build_llama
    from tilt.rollout import activation_bytes_per_position, auto_activation_bytes, auto_micro_batch_tokens
    from tilt.trainer import build

    small = build_llama(len(char_tok), hidden=32, layers=2, heads=2, intermediate=64)
    wide = build_llama(len(char_tok), hidden=256, layers=8, heads=4, intermediate=1024)
    big_vocab = build_llama(50_000, hidden=32, layers=2, heads=2, intermediate=64)
    per_pos = 4 * (2 * (6 * 32 + 4 * 64) + len(char_tok))  # 4 bytes x (2 layers x (192 + 256) + vocab)
    assert per_pos == 4 * (896 + len(char_tok))
    assert activation_bytes_per_position(small) == per_pos
    assert auto_micro_batch_tokens(small, budget_bytes=3 << 30) == (3 << 30) // per_pos
    assert auto_micro_batch_tokens(small) == auto_activation_bytes() // per_pos
    assert auto_micro_batch_tokens(wide) < auto_micro_batch_tokens(small)
    assert auto_micro_batch_tokens(big_vocab) < auto_micro_batch_tokens(small)
    assert auto_micro_batch_tokens(small, budget_bytes=1) == 256
    gib = 1 << 30
    assert auto_activation_bytes(24 * gib) == 3 * gib
    assert auto_activation_bytes(12 * gib) == 2 * gib  # at least 2 GiB
    assert auto_activation_bytes(256 * gib) == 8 * gib  # at most 8 GiB
    assert rollout.machine_memory_bytes() > 0  # Linux: physical memory or the cgroup's limit
    # a container's cgroup limit below physical memory wins; "max" and unreadable text mean no limit
    (tmp_path / "cg").mkdir()
    limit, unlimited, garbage = tmp_path / "cg" / "a", tmp_path / "cg" / "b", tmp_path / "cg" / "c"
    limit.write_text("1073741824\n"), unlimited.write_text("max\n"), garbage.write_text("n/a\n")
    monkeypatch.setattr(rollout, "CGROUP_MEMORY_FILES", (str(unlimited), str(garbage), str(limit), str(tmp_path / "none")))
    assert rollout.machine_memory_bytes() == gib
    monkeypatch.setattr(rollout, "CGROUP_MEMORY_FILES", (str(unlimited), str(garbage)))
    assert rollout.machine_memory_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(rollout, "machine_memory_bytes", lambda: None)
    assert auto_activation_bytes() == 2 * gib  # unknown memory: the minimum
    monkeypatch.setattr(rollout, "machine_memory_bytes", lambda: 40 * gib)
    assert auto_micro_batch_tokens(small) == 5 * gib // per_pos
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'r'}", "kl.beta=0.04"])
    assert cfg.train.micro_batch_tokens == "auto"
    parts = build(cfg)
    assert parts.learner.micro_batch_tokens == parts.run.chunk_tokens == auto_micro_batch_tokens(parts.policy.model)
    for bad in ("train.micro_batch_tokens=0", "train.micro_batch_tokens=big"):
        with pytest.raises((ValidationError, ValueError)):
            load_config(None, [bad])
    assert load_config(None, ["train.micro_batch_tokens=null"]).train.micro_batch_tokens is None


def test_group_minibatches_hold_whole_groups(tiny_llama_dir):
    """``minibatch_by="group"`` shuffles whole groups: the order is a permutation of the rows, each
    group's rows are contiguous, and different generator states give different group orders."""
    pol = load_policy(str(tiny_llama_dir))
    batch = _batch(pol, n_prompts=3, g=4)
    learner = _learner(pol.model, minibatches=3)
    learner.minibatch_by = "group"
    orders = set()
    for _ in range(8):
        perm = learner.permutation(batch)
        assert sorted(perm.tolist()) == list(range(12))
        groups = batch.group_index[perm].view(3, 4)  # 3 mini-batches of one group each
        assert bool((groups == groups[:, :1]).all()) and len(set(groups[:, 0].tolist())) == 3
        orders.add(tuple(groups[:, 0].tolist()))
    assert len(orders) > 1, "the group order must be shuffled"
    with pytest.raises(ValueError, match="minibatch_by must be 'row' or 'group'"):
        Learner(pol.model, None, None, loss_fn=None, loss_needs=(), reduction="token-mean", max_len=1,
                temperature=1.0, kl_fn=None, kl_beta=0.0, kl_in_loss=False, epochs=1, minibatches=1,
                grad_accum=1, grad_clip=1.0, generator=torch.Generator(), minibatch_by="prompt")


def test_shared_prompt_backward_is_bitwise_deterministic(char_tok, tmp_path):
    """Two threads, the same batch, the same weights: the shared-prompt forward's gradients are
    bit-identical every time (its prompt expansion uses index_select, whose backward is
    deterministic on CPU; advanced indexing's accumulate-backward is not)."""
    from tilt.model import build_llama
    from tilt.rollout import completion_logits

    model = build_llama(len(char_tok), hidden=64, layers=2, heads=2, intermediate=128, seed=0)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, len(char_tok), (16, 24), generator=g).repeat_interleave(8, 0)  # [128, 24]
    prompt_ids = prompt_ids[torch.randperm(128, generator=g)]
    prompt_mask = torch.ones_like(prompt_ids)
    comp = torch.randint(3, len(char_tok), (128, 6), generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = set()
        for _ in range(6):
            model.zero_grad()
            logits, _ = completion_logits(model, prompt_ids, prompt_mask, comp, torch.ones_like(comp))
            logits.pow(2).mean().backward()
            grads.add(b"".join(p.grad.numpy().tobytes() for p in model.parameters()))
    finally:
        torch.set_num_threads(before)
    assert len(grads) == 1


def test_trainer_adamw_is_fused_and_equals_the_default_update():
    from tilt.trainer import adamw

    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    fused, plain = adamw(list(a.parameters()), **kw), torch.optim.AdamW(b.parameters(), **kw)
    assert fused.param_groups[0]["fused"] is True
    start = copy.deepcopy(a.state_dict())
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    assert all((v - start[k]).abs().max() > 1e-2 for k, v in a.state_dict().items())  # the steps moved it
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_kl_estimator_gets_old_logp_through_its_needs(tiny_llama_dir):
    """k3_is declares needs=(old_logp, mask); the learner passes them (``kl_inputs``), so its KL
    term is the ratio-weighted k3 of the batch's sampling log-probs, not the on-policy k3."""
    from tilt.batch import PolicyLossInput
    from tilt.learner import forward_logits
    from tilt.reduction import reduce_tokens, reduction_denominator

    pol = load_policy(str(tiny_llama_dir), dtype=torch.float64)
    batch = _batch(pol)
    batch.old_logp = batch.old_logp - 0.3 * batch.completion_mask  # off-policy: ratio e^0.3 on every token
    learner = _learner(pol.model, "grpo")
    entry = KL_ESTIMATORS.entry("k3_is")
    learner.kl_fn, learner.kl_inputs = entry.fn, tuple(entry.meta["needs"])
    mask = batch.completion_mask.double()
    denom = reduction_denominator(mask, "seq-mean-token-mean")
    loss, _ = learner.micro_loss(batch, denom)
    logp = torch.log_softmax(forward_logits(pol.model, batch, 1.0), -1).gather(
        -1, batch.completion_ids[..., None]).squeeze(-1)  # [N, T]
    per_token, _ = LOSSES.get("grpo")(PolicyLossInput(logp=logp, old_logp=batch.old_logp,
                                                      advantages=batch.advantages, mask=mask))
    kl = entry.fn(logp, batch.ref_logp, old_logp=batch.old_logp, mask=mask)  # [N, T]
    expected = reduce_tokens(per_token + 0.04 * kl, mask, mode="seq-mean-token-mean", denominator=denom)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    on_policy_kl = entry.fn(logp, batch.ref_logp, mask=mask)  # what it would be without the need
    assert not torch.allclose(kl * mask, on_policy_kl * mask)
