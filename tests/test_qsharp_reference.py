"""Q♯ conventions of the reference code (docs/qsharp.md "Against the reference code"): top-k guidance that
keeps the other tokens at pi_ref, and training on every roll-out token with per-roll-out averaging."""
import math
import statistics

import pytest
import torch

from tilt.decoding import DECODERS
from tilt.decoding.lm import Decoding
from tilt.decoding.qsharp import qsharp_exact, rollin_rollout, soft_q_bernoulli
from tilt.decoding.train_value import ValueData, _bce, collect, train_value
from tilt.decoding.value_model import QHead
from tilt.exact import (decoded_sequences, make_needle_tree, make_tree, sequence_probs, tilted_distribution,
                        total_variation)
from tilt.model import load_policy
from tilt.tasks.mix import parse_mix, sample_items

P = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)


def test_rest_ref_keeps_tokens_outside_the_top_k_at_pi_ref():
    q = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    # top_k=2 keeps tokens 0, 1. rest="drop": (.5, .3*2, 0) / 1.1
    drop = DECODERS.get("qsharp")(P.log(), values=q, beta=1.0, top_k=2).exp()
    assert torch.allclose(drop, torch.tensor([[0.5, 0.6, 0.0]], dtype=torch.float64) / 1.1)
    # rest="ref": token 2 keeps pi_ref with Q = 0 (its Q = log 3 is not read): (.5, .6, .2) / 1.3
    ref = DECODERS.get("qsharp")(P.log(), values=q, beta=1.0, top_k=2, rest="ref").exp()
    assert torch.allclose(ref, torch.tensor([[0.5, 0.6, 0.2]], dtype=torch.float64) / 1.3)
    # without top_k, rest changes nothing: (.5, .6, .6) / 1.7 both ways
    for rest in ("drop", "ref"):
        full = DECODERS.get("controlled")(P.log(), values=q, beta=1.0, rest=rest).exp()
        assert torch.allclose(full, torch.tensor([[0.5, 0.6, 0.6]], dtype=torch.float64) / 1.7)
    with pytest.raises(ValueError, match="rest must be 'drop' or 'ref'"):
        DECODERS.get("transfer_q")(P.log(), values=q, beta=1.0, top_k=2, rest="keep")


def test_rest_ref_offset_is_the_reference_bernoulli_offset():
    """The reference adds log(1 + e^(eta + l)) - log(1 + e^l) (l the success logit, eta = 1/beta) to the
    top-k logits; Q/beta with Q = soft_q_bernoulli is the same number: log(1 - p + p e^eta)."""
    beta, logit = 0.25, torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    eta = 1 / beta
    reference = torch.logaddexp(eta + logit, torch.zeros(3, dtype=torch.float64)) - torch.logaddexp(
        logit, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(soft_q_bernoulli(torch.sigmoid(logit), beta=beta) / beta, reference, atol=1e-12)


def test_all_token_loss_is_the_mean_over_roll_outs_of_the_per_token_mean():
    # two roll-outs: one of 1 token (r = 1), one of 3 tokens (r = 0); log weights -log L
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 3, generator=gen)
    data = ValueData(hidden, torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 0.0, 0.0, 0.0]),
                     torch.tensor([0.0, -math.log(3), -math.log(3), -math.log(3)]))
    head = QHead(3, 3)
    torch.nn.init.normal_(head.proj.weight, generator=gen)
    logits = head(hidden).gather(-1, data.tokens[:, None]).squeeze(-1)  # [4]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.rewards, reduction="none")
    expected = 0.5 * (bce[0] + bce[1:].mean())  # the reference: per-sequence mean, then batch mean
    assert torch.allclose(_bce(head, data, torch.arange(4)), expected, atol=1e-6)


def test_collect_all_tokens_holds_every_roll_out_token_and_a_h_first(tiny_llama_dir):
    pol = load_policy(str(tiny_llama_dir))
    items = sample_items(parse_mix("addition:1"), split="train", start=0, count=4)
    one = collect(pol, items, Decoding("sample"), max_new_tokens=5, generator=torch.Generator().manual_seed(3))
    every = collect(pol, items, Decoding("sample"), max_new_tokens=5, generator=torch.Generator().manual_seed(3),
                    all_tokens=True)
    lengths = torch.exp(-every.log_weights).round().long()  # [M] the roll-out length L on each of its tokens
    # the same seed draws the same roll-outs: the first token of each is the a_h example of the default
    firsts = torch.tensor(_roll_out_starts(lengths))
    assert len(firsts) == 4 and (lengths >= 1).all()
    assert torch.equal(every.tokens[firsts], one.tokens) and torch.equal(every.rewards[firsts], one.rewards)
    assert torch.allclose(every.hidden[firsts], one.hidden, atol=1e-5)
    w = torch.softmax(every.log_weights, 0)  # [M] the fit's token weights
    per_roll_out = torch.stack([w[i:i + int(lengths[i])].sum() for i in firsts.tolist()])  # [4]
    assert torch.allclose(per_roll_out, torch.full((4,), 0.25))  # every roll-out weighs the same
    with pytest.raises(ValueError, match="all_tokens is not available with indirect"):
        collect(pol, items, Decoding("sample"), max_new_tokens=5, generator=torch.Generator().manual_seed(3),
                rollout_model=pol.model, indirect_beta=1.0, all_tokens=True)

    head, stats = train_value(pol, [items, items], beta=0.5, top_k=3, max_new_tokens=5, epochs=3, all_tokens=True,
                              log=lambda _: None)
    assert stats[0]["examples"] > 4 and stats[1]["examples"] > stats[0]["examples"]  # tokens, aggregated
    assert 0.0 <= stats[0]["rollout_reward"] <= 1.0


def _roll_out_starts(lengths: torch.Tensor) -> list[int]:
    """Index of the first token of each roll-out in the flat all-token data (each roll-out's L tokens
    are contiguous and carry L)."""
    starts, i = [], 0
    while i < len(lengths):
        starts.append(i)
        i += int(lengths[i])
    return starts


def test_rest_ref_is_closer_to_pi_star_than_drop_on_the_trees():
    """With the exact Q* (rewards >= 0, so Q* >= 0) and k < V, keeping the other tokens at pi_ref (Q = 0)
    lands nearer pi* than truncating them: measured on three trees (docs/qsharp.md)."""
    for tree in (make_tree(), make_tree(depth=3, vocab=3, seed=4), make_tree(depth=3, vocab=5, seed=1)):
        for beta in (0.5, 2.0):
            target = tilted_distribution(tree, beta)
            for k in range(1, tree.vocab):
                tv = {rest: total_variation(decoded_sequences(tree, DECODERS.get("qsharp"), values=tree.soft_q(beta),
                                                              beta=beta, top_k=k, rest=rest), target)
                      for rest in ("drop", "ref")}
                assert tv["ref"] < tv["drop"], (k, beta, tv)


def test_tabular_all_tokens_adds_every_later_token_and_learns_faster_on_the_needle_tree():
    tree = make_needle_tree()  # depth 4
    guided = torch.softmax(tree.ref_logits, -1)
    s1, a1, r1 = rollin_rollout(tree, guided, 50, torch.Generator().manual_seed(0))
    s, a, r = rollin_rollout(tree, guided, 50, torch.Generator().manual_seed(0), all_tokens=True)
    assert len(s1) == 50 and 50 < len(s) <= 200  # sum over roll-outs of (depth - h) samples
    assert set(zip(s1.tolist(), a1.tolist(), r1.tolist())) <= set(zip(s.tolist(), a.tolist(), r.tolist()))
    # same roll-outs, more samples: mean TV over 8 seeds, 4 rounds x 800 (docs/qsharp.md: .192 -> .116)
    target = tilted_distribution(tree, 0.1)
    tv = {at: statistics.mean(total_variation(sequence_probs(tree, qsharp_exact(
        tree, beta=0.1, samples_per_round=800, rounds=4, seed=seed, all_tokens=at)[0]), target).item()
        for seed in range(8)) for at in (False, True)}
    assert tv[True] < 0.8 * tv[False], tv
