"""Decoders on a causal LM: today's sampling unchanged, guided decoding with a Q head, config/CLI, bad input."""
import json

import pytest
import torch
from typer.testing import CliRunner

from tilt.cli import app
from tilt.config import ConfigError, load_config
from tilt.decoding.lm import Decoding, decoding_from_config, guided_generate
from tilt.decoding.qsharp import soft_q_bernoulli
from tilt.decoding.rules import sample_logp
from tilt.decoding.train_value import train_value
from tilt.decoding.value_model import QHead, load_q_head, save_q_head
from tilt.evaluate import evaluate_items
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate
from tilt.tasks.mix import eval_items, parse_mix, sample_items
from tilt.tokenizer import build_char_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def pol(tiny_llama_dir):
    return load_policy(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def items():
    return eval_items(parse_mix("addition:1"), per_cell=3)


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, pol):
    d = tmp_path_factory.mktemp("qhead")
    save_q_head(QHead(pol.model.config.hidden_size, pol.model.config.vocab_size), d, tokenizer=pol.tokenizer,
                base_model="tiny")
    return d


def test_sample_decoder_is_todays_evaluation_sample_for_sample(pol, items):
    kw = dict(n_samples=3, max_new_tokens=6, seed=5)
    before = evaluate_items(pol.model, pol.tokenizer, items, **kw)
    after = evaluate_items(pol.model, pol.tokenizer, items, decoding=Decoding.build("sample", model=pol.model), **kw)
    assert [r.sample_rewards for r in before] == [r.sample_rewards for r in after]
    assert decoding_from_config(load_config(None, []).decode, pol) is None  # default config: the old path


def test_guided_loop_with_the_sample_rule_draws_the_same_tokens_as_generate(pol):
    ids, mask = encode_prompts(pol.tokenizer, ["st 1+2=", "12+3=", "7*8="])
    ref = generate(pol.model, ids, mask, params=SamplingParams(8, 1.0), eos_id=pol.eos_id, pad_id=pol.pad_id,
                   generator=torch.Generator().manual_seed(3))
    mine, ref_logp = guided_generate(pol.model, ids, mask, rule=lambda lg, values: sample_logp(lg), q_fn=None,
                                     max_new_tokens=8, eos_id=pol.eos_id, pad_id=pol.pad_id,
                                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(mine.completion_ids, ref.completion_ids)
    assert torch.allclose(mine.logprobs, ref_logp, atol=1e-6)  # sampling pi_ref: zero KL estimate


def test_zero_head_gives_uniform_q_so_qsharp_is_pi_ref(pol, head_dir):
    head = load_q_head(head_dir, tokenizer=pol.tokenizer, hidden_size=pol.model.config.hidden_size)
    q = head.q_values(torch.randn(2, pol.model.config.hidden_size), beta=0.5)  # [2, V]
    # p = .5 everywhere: beta log(.5 + .5 e^2) = .5 log(4.19453) = .5 * 1.43378 = .71689
    assert torch.allclose(q, torch.full_like(q, 0.716889), atol=1e-5)
    assert torch.allclose(soft_q_bernoulli(torch.tensor(0.5), beta=0.5), torch.tensor(0.716889), atol=1e-5)
    dec = Decoding.build("qsharp", {"beta": 0.5}, value_model=str(head_dir), model=pol.model, tokenizer=pol.tokenizer)
    ids, mask = encode_prompts(pol.tokenizer, ["st 1+2="])
    batch, ref_logp = dec.generate(pol.model, ids, mask, max_new_tokens=6, eos_id=pol.eos_id, pad_id=pol.pad_id,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(batch.logprobs, ref_logp, atol=1e-5)  # constant Q: guided == pi_ref
    # controlled / transfer_q read E[r | s, a] = p = .5, not the soft Q
    assert torch.allclose(head.success_probs(torch.randn(2, pol.model.config.hidden_size)), torch.tensor(0.5))
    for name in ("controlled", "transfer_q"):
        dec = Decoding.build(name, {"beta": 0.5}, value_model=str(head_dir), model=pol.model, tokenizer=pol.tokenizer)
        batch, ref_logp = dec.generate(pol.model, ids, mask, max_new_tokens=6, eos_id=pol.eos_id, pad_id=pol.pad_id,
                                       generator=torch.Generator().manual_seed(0))
        assert torch.allclose(batch.logprobs, ref_logp, atol=1e-5)


def test_sequence_decoders_pick_one_of_n_reference_samples(pol, head_dir):
    ids, mask = encode_prompts(pol.tokenizer, ["st 1+2=", "12+3="])
    for name, kw in (("best_of_n", {"n": 3}), ("resample", {"n": 3, "beta": 0.5})):
        dec = Decoding.build(name, kw, value_model=str(head_dir), model=pol.model, tokenizer=pol.tokenizer)
        batch, ref_logp = dec.generate(pol.model, ids, mask, max_new_tokens=5, eos_id=pol.eos_id, pad_id=pol.pad_id,
                                       generator=torch.Generator().manual_seed(0))
        assert batch.completion_ids.shape[0] == 2 and ref_logp is None
        # the zero head scores all candidates alike, so best-of-n keeps the first of the 3 draws
        if name == "best_of_n":
            cands = generate(pol.model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0),
                             params=SamplingParams(5, 1.0), eos_id=pol.eos_id, pad_id=pol.pad_id,
                             generator=torch.Generator().manual_seed(0))
            assert torch.equal(batch.completion_ids, cands.completion_ids[[0, 3]])
    with pytest.raises(ValueError, match="n >= 1"):
        Decoding.build("best_of_n", {"n": 0}, value_model=str(head_dir), model=pol.model, tokenizer=pol.tokenizer)


def test_bad_decoder_inputs_are_clear_errors(pol, head_dir):
    with pytest.raises(ValueError, match="needs a value model"):
        Decoding.build("qsharp", {"beta": 1.0}, model=pol.model, tokenizer=pol.tokenizer)
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        Decoding.build("qsharp", {"beta": 1.0}, value_model=str(head_dir), model=pol.model, tokenizer=other)
    vocab = pol.model.config.vocab_size
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        Decoding.build("top_k", {"k": vocab + 1}, model=pol.model)
    with pytest.raises(ValueError, match="beta must be > 0"):
        Decoding.build("qsharp", {"beta": 0.0}, value_model=str(head_dir), model=pol.model, tokenizer=pol.tokenizer)
    with pytest.raises(ValueError, match="do not fit decoder"):
        Decoding.build("top_k", {"kk": 3}, model=pol.model)
    with pytest.raises(FileNotFoundError, match="train one"):
        Decoding.build("qsharp", {}, value_model="/nonexistent", model=pol.model, tokenizer=pol.tokenizer)
    with pytest.raises(ConfigError, match="needs a value model"):
        load_config(None, ["decode.name=qsharp"])
    with pytest.raises(ConfigError, match="valid names"):
        load_config(None, ["decode.name=beam"])


def test_train_value_round_trip_and_guided_eval(pol, tmp_path, items):
    rounds = [sample_items(parse_mix("addition:1"), split="train", start=r * 4, count=4) for r in range(2)]
    head, stats = train_value(pol, rounds, beta=0.5, top_k=None, max_new_tokens=6, epochs=5, log=lambda _: None)
    assert [s["examples"] for s in stats] == [4, 8]  # data aggregated across rounds
    save_q_head(head, tmp_path / "vm", tokenizer=pol.tokenizer, base_model="tiny")
    dec = Decoding.build("qsharp", {"beta": 0.5, "top_k": 5}, value_model=str(tmp_path / "vm"), model=pol.model,
                         tokenizer=pol.tokenizer)
    res = evaluate_items(pol.model, pol.tokenizer, items, n_samples=2, max_new_tokens=6, decoding=dec)
    assert all(len(r.sample_rewards) == 2 for r in res)


def test_cli_decode_writes_completions_and_refuses_missing_value_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "c.jsonl"
    res = runner.invoke(app, ["decode", str(tiny_llama_dir), "--decode", "top_k", "--decode-kwargs", '{"k": 5}',
                              "--tasks", "addition:1", "--per-cell", "2", "--n", "2", "--max-new-tokens", "4",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["decoder"] == "top_k" and lines[0]["kl_to_ref"] >= 0.0
    bad = runner.invoke(app, ["decode", str(tiny_llama_dir), "--decode", "qsharp", "--out", str(out)])
    assert bad.exit_code == 2 and "needs a value model" in bad.output
    ev = runner.invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "addition:1", "--per-cell", "2", "--n", "2",
                             "--decode", "min_p", "--decode-kwargs", '{"p": 0.2}', "--out", str(tmp_path / "e.json")])
    assert ev.exit_code == 0, ev.output
    assert json.loads((tmp_path / "e.json").read_text())["decode"]["name"] == "min_p"


def test_cli_train_value_saves_beside_the_model(tiny_llama_dir, tmp_path):
    res = runner.invoke(app, ["train-value", str(tiny_llama_dir), "--tasks", "addition:1", "--rounds", "1",
                              "--prompts", "4", "--epochs", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "vm")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "vm" / "q_head.json").read_text())
    assert meta["reward"] == "bernoulli" and len(meta["rounds"]) == 1 and meta["rollout_model"] is None
    tq = runner.invoke(app, ["train-value", str(tiny_llama_dir), "--tasks", "addition:1", "--rounds", "1",
                             "--prompts", "4", "--epochs", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "tq"),
                             "--rollout-model", str(tiny_llama_dir)])  # Transfer Q*: roll out with an aligned model
    assert tq.exit_code == 0, tq.output
    assert json.loads((tmp_path / "tq" / "q_head.json").read_text())["rollout_model"] == str(tiny_llama_dir)
    bad = runner.invoke(app, ["train-value", str(tiny_llama_dir), "--val-frac", "1.5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--val-frac" in bad.output


def test_fit_head_early_stopping_keeps_the_best_held_out_epoch():
    from tilt.decoding.train_value import ValueData, _bce, fit_head

    gen = torch.Generator().manual_seed(0)
    data = ValueData(torch.randn(50, 8, generator=gen), torch.randint(0, 5, (50,), generator=gen),
                     (torch.rand(50, generator=gen) < 0.5).float())  # rewards independent of the features
    head = QHead(8, 5)
    best = fit_head(head, data, epochs=100, lr=0.1, val_frac=0.2, generator=torch.Generator().manual_seed(1))
    val = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:10]  # the same held-out split
    assert abs(_bce(head, data, val).item() - best) < 1e-6  # the returned head is the best epoch's


def test_train_heldout_uses_the_decode_section(tiny_llama_dir, tmp_path):
    """decode.* reaches the trainer's held-out evaluation (and so `tilt compare`), and `tilt eval` of the run
    with the same decoder reproduces its final held-out pass@1."""
    from tilt.trainer import train

    run = tmp_path / "r"
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={run}", "train.steps=1",
                             "rollout.prompts_per_step=2", "rollout.group_size=2", "tasks.eval_per_cell=2",
                             "tasks.mix=addition:1", "log.tensorboard=false", "log.progress=none", "log.plot=false",
                             "decode.name=top_k", "decode.kwargs.k=3"])
    train(cfg, echo=lambda s: None)
    res = runner.invoke(app, ["eval", str(run), "--k", "1"])  # the run's own decode section
    assert res.exit_code == 0, res.output
    report = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())["heldout"]
    assert report["decode"]["name"] == "top_k"
    for cell, vals in summary["per_cell"].items():
        assert report["per_cell"][cell]["pass1"] == pytest.approx(vals["pass1"])
    plain = runner.invoke(app, ["eval", str(run), "--k", "1", "--decode", "sample", "--out", str(tmp_path / "p.json")])
    assert plain.exit_code == 0 and json.loads((tmp_path / "p.json").read_text())["decode"]["name"] == "sample"
