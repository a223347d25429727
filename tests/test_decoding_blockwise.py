"""E4 blockwise controlled decoding: the loop the LM uses, run on exact trees, samples its closed-form law;
on a tiny Llama it is best-of-K per block, runs through `tilt decode`, and refuses bad kwargs."""
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tilt.cli import app
from tilt.config import ConfigError, load_config
from tilt.decoding import DECODERS
from tilt.decoding.blockwise import blockwise_decode
from tilt.decoding.lm import Decoding
from tilt.decoding.value_model import QHead, save_q_head
from tilt.exact import (TokenTree, blockwise_k_sequences, blockwise_sequences, level_offset, make_tree,
                        sequence_probs, total_variation)
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate

runner = CliRunner()


def tree_callables(tree: TokenTree, q, generator):
    """pi_ref of the tree as a block proposer and q[s_{T-1}, y_T] as the prefix scorer (no EOS on a tree)."""
    v = tree.vocab

    def state(prefix):  # [N, t] -> [N] state index of the prefix
        t = prefix.shape[1]
        weights = torch.tensor([v ** (t - 1 - j) for j in range(t)], dtype=torch.long)
        return level_offset(t, v) + (prefix * weights).sum(-1)

    def propose(rows, prefix, length):
        ids = prefix
        for _ in range(length):
            probs = torch.softmax(tree.ref_logits[state(ids)], -1)  # [N, V]
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
        block = ids[:, prefix.shape[1]:]
        return block, torch.ones_like(block), torch.zeros(block.shape)

    def score(rows, ids, mask):
        return q[state(ids[:, :-1]), ids[:, -1]]

    return propose, score


def empirical_law(tree: TokenTree, ids) -> torch.Tensor:
    d, v = tree.depth, tree.vocab
    index = (ids * torch.tensor([v ** (d - 1 - j) for j in range(d)])).sum(-1)  # lexicographic sequence number
    return torch.bincount(index, minlength=v ** d).double() / ids.shape[0]


def test_blockwise_k_law_by_hand_on_one_step():
    # one token, pi_ref = (.25, .75) (logits 0, log 3), rewards (1, 0), one block, k = 2 draws
    tree = TokenTree(depth=1, vocab=2, rewards=torch.tensor([1.0, 0.0], dtype=torch.float64),
                     ref_logits=torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
    q = tree.soft_q(1.0)  # at the last step Q = r
    # argmax: token 1 only if both draws are 1: P(1) = .75^2 = .5625, P(0) = .4375
    assert torch.allclose(blockwise_k_sequences(tree, q, block=1, k=2), torch.tensor([[0.4375, 0.5625]],
                                                                                     dtype=torch.float64))
    # beta = 1: P(0) = .25^2 + 2 (.25)(.75) e / (e + 1) = .0625 + .375 * .731059 = .336647
    assert blockwise_k_sequences(tree, q, block=1, k=2, beta=1.0)[0, 0].item() == pytest.approx(0.336647, abs=1e-6)
    # k = 1 is pi_ref
    assert torch.allclose(blockwise_k_sequences(tree, q, block=1, k=1, beta=1.0), torch.tensor([[0.25, 0.75]],
                                                                                              dtype=torch.float64))


def test_blockwise_k_law_is_pi_ref_at_k1_and_tends_to_the_enumerated_block_law():
    tree = make_tree(depth=3, vocab=2, seed=3)
    q = tree.soft_q(0.5)
    ref = sequence_probs(tree, torch.softmax(tree.ref_logits, -1))
    for block in (1, 2, 3):
        assert total_variation(blockwise_k_sequences(tree, q, block=block, k=1, beta=0.5), ref) < 1e-12
        assert total_variation(blockwise_k_sequences(tree, q, block=block, k=1), ref) < 1e-12
        target = blockwise_sequences(tree, q, beta=0.5, block=block)  # every block enumerated: pi*
        tvs = [total_variation(blockwise_k_sequences(tree, q, block=block, k=k, beta=0.5), target)
               for k in (1, 2, 4, 8)]
        assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs


@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_blockwise_loop_on_the_tree_samples_its_closed_form_law(beta, block):
    """The decode loop the LM runs, fed the tree's pi_ref and the exact Q*, against blockwise_k_sequences.
    40000 sequences over 8 outcomes: the sampling TV is about 0.005; tolerance 0.015. The same draws are
    far (> 0.05) from pi_ref, so the check can fail."""
    tree = make_tree(depth=3, vocab=2, seed=3)
    q = tree.soft_q(0.5)
    gen = torch.Generator().manual_seed(0)
    propose, score = tree_callables(tree, q, gen)
    select = lambda s: DECODERS.get("controlled_block")(s, k=3, block_len=block, beta=beta, generator=gen)  # noqa: E731
    ids, mask, _ = blockwise_decode(40_000, propose=propose, score=score, select=select, k=3, block_len=block,
                                    max_new_tokens=3, eos_id=-1, pad_id=0)
    assert ids.shape == (40_000, 3) and bool(mask.bool().all())
    law = blockwise_k_sequences(tree, q, block=block, k=3, beta=beta)
    emp = empirical_law(tree, ids)[None]
    assert total_variation(emp, law) < 0.015
    assert total_variation(emp, sequence_probs(tree, torch.softmax(tree.ref_logits, -1))) > 0.05


@pytest.fixture(scope="module")
def pol(tiny_llama_dir):
    return load_policy(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def random_head_dir(tmp_path_factory, pol):
    torch.manual_seed(7)
    head = QHead(pol.model.config.hidden_size, pol.model.config.vocab_size)
    torch.nn.init.normal_(head.proj.weight, std=1.0)
    d = tmp_path_factory.mktemp("rhead")
    save_q_head(head, d, tokenizer=pol.tokenizer, base_model="tiny")
    return d


def test_one_block_over_the_whole_budget_is_best_of_k(pol, random_head_dir):
    """block_len >= max_new_tokens: one block, so blockwise CD = best-of-K of pi_ref samples under the
    prefix score; E[r | s, a] and the soft Q are monotone in each other, so it keeps the same sample."""
    ids, mask = encode_prompts(pol.tokenizer, ["st 1+2=", "12+3="])
    kw = dict(max_new_tokens=5, eos_id=pol.eos_id, pad_id=pol.pad_id)
    blk = Decoding.build("controlled_block", {"k": 3, "block_len": 8}, value_model=str(random_head_dir),
                         model=pol.model, tokenizer=pol.tokenizer)
    bon = Decoding.build("best_of_n", {"n": 3}, value_model=str(random_head_dir), model=pol.model,
                         tokenizer=pol.tokenizer)
    a, ref_a = blk.generate(pol.model, ids, mask, generator=torch.Generator().manual_seed(4), **kw)
    b, _ = bon.generate(pol.model, ids, mask, generator=torch.Generator().manual_seed(4), **kw)
    assert ref_a is None
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)  # log pi_ref of the kept sample
    # the random head does not keep the first draw of every row, so a choice was made
    cands = generate(pol.model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0),
                     params=SamplingParams(5, 1.0), eos_id=pol.eos_id, pad_id=pol.pad_id,
                     generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a.completion_ids, cands.completion_ids[[0, 3]])


def test_short_blocks_build_a_full_completion_with_ref_logprobs(pol, random_head_dir):
    ids, mask = encode_prompts(pol.tokenizer, ["st 1+2=", "12+3=", "7*8="])
    dec = Decoding.build("controlled_block", {"k": 2, "block_len": 2, "beta": 0.5}, value_model=str(random_head_dir),
                         model=pol.model, tokenizer=pol.tokenizer)
    batch, _ = dec.generate(pol.model, ids, mask, max_new_tokens=7, eos_id=pol.eos_id, pad_id=pol.pad_id,
                            generator=torch.Generator().manual_seed(0))
    assert batch.completion_ids.shape[0] == 3 and batch.completion_ids.shape[1] <= 7
    m = batch.completion_mask.bool()
    # mask is a prefix (no gaps) and the stored log-probs are log pi_ref of the kept tokens (teacher-forced)
    assert torch.equal(batch.completion_mask, torch.sort(batch.completion_mask, -1, descending=True).values)
    from tilt.rollout import sequence_logprobs

    with torch.no_grad():
        ref, _ = sequence_logprobs(pol.model, ids, mask, batch.completion_ids, batch.completion_mask)
    assert torch.allclose(batch.logprobs[m], ref.float()[m], atol=1e-4)


def test_bad_blockwise_kwargs_are_clear_errors(pol, random_head_dir):
    build = lambda kw: Decoding.build("controlled_block", kw, value_model=str(random_head_dir),  # noqa: E731
                                      model=pol.model, tokenizer=pol.tokenizer)
    with pytest.raises(ValueError, match="k >= 1"):
        build({"k": 0})
    with pytest.raises(ValueError, match="block_len >= 1"):
        build({"k": 2, "block_len": 0})
    with pytest.raises(ValueError, match="block_len >= 1"):
        build({"k": 2, "block_len": "2"})
    with pytest.raises(ValueError, match="beta must be > 0"):
        build({"k": 2, "beta": 0.0})
    with pytest.raises(ValueError, match="do not fit decoder"):
        build({"k": 2, "blocks": 3})
    with pytest.raises(ValueError, match="needs a value model"):
        Decoding.build("controlled_block", {"k": 2}, model=pol.model, tokenizer=pol.tokenizer)
    with pytest.raises(ConfigError, match="needs a value model"):
        load_config(None, ["decode.name=controlled_block"])


def test_cli_decode_with_a_trained_head(tiny_llama_dir, tmp_path):
    vm = tmp_path / "vm"
    res = runner.invoke(app, ["train-value", str(tiny_llama_dir), "--tasks", "addition:1", "--rounds", "1",
                              "--prompts", "4", "--epochs", "3", "--max-new-tokens", "4", "--out", str(vm)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "c.jsonl"
    res = runner.invoke(app, ["decode", str(tiny_llama_dir), "--decode", "controlled_block", "--decode-kwargs",
                              '{"k": 2, "block_len": 2}', "--value-model", str(vm), "--tasks", "addition:1",
                              "--per-cell", "2", "--n", "2", "--max-new-tokens", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and {x["decoder"] for x in lines} == {"controlled_block"}
    assert all(x["kl_to_ref"] is None for x in lines)  # no per-token decoder law to estimate KL from
    ev = runner.invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "addition:1", "--per-cell", "2", "--n", "2",
                             "--decode", "controlled_block", "--decode-kwargs", '{"k": 2, "block_len": 3, "beta": 0.5}',
                             "--value-model", str(vm), "--out", str(tmp_path / "e.json")])
    assert ev.exit_code == 0, ev.output
    assert json.loads((tmp_path / "e.json").read_text())["decode"]["name"] == "controlled_block"
    bad = runner.invoke(app, ["decode", str(tiny_llama_dir), "--decode", "controlled_block", "--decode-kwargs",
                              '{"k": 0}', "--value-model", str(vm), "--out", str(out)])
    assert bad.exit_code == 2 and "k >= 1" in bad.output
