"""E6 Q* step search on an LM: learned step Q, LM step proposer, best-first search, decoder entry, bad input."""
import functools
import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from tilt.cli import app
from tilt.decoding.lm import Decoding
from tilt.decoding.step_search import (collect_step_data, delimiter_ids, head_step_value, propose_steps,
                                       q_step_search, rollout_labels, step_ends, step_examples, train_step_q)
from tilt.decoding.train_value import fit_head
from tilt.decoding.value_model import QHead, save_q_head
from tilt.evaluate import evaluate_items
from tilt.model import load_policy
from tilt.rollout import encode_prompts
from tilt.tasks.addition_steps import AdditionStepsTask
from tilt.tasks.mix import eval_items, parse_mix, sample_items
from tilt.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id
PROMPT = torch.tensor(TOK("st 3+4=").input_ids)  # [P] with BOS; 3 + 4 = 7, reference "7c0>7"
DELIMS = delimiter_ids(TOK, ",>")
CHAR = {i: ("$" if i == EOS else t) for t, i in TOK.get_vocab().items()}
ID = {c: i for i, c in CHAR.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is ~30x faster than two on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def law(prefix: str) -> dict[str, float]:
    """pi_ref of the stub LM after completion text ``prefix`` ("$" = EOS): the column digit is 7 (right)
    w.p. .75 or 6; then "c0>"; the answer copies the column digit w.p. .8; then EOS."""
    pos = len(prefix)
    if pos == 0:
        return {"7": 0.75, "6": 0.25}
    if pos in (1, 2, 3):
        return {"c0>"[pos - 1]: 1.0}
    if pos == 4:
        other = "6" if prefix[0] == "7" else "7"
        return {prefix[0]: 0.8, other: 0.2}
    return {"$": 1.0}


def exact_value(prefix: str) -> float:
    """E_{pi_ref}[r | prefix] by enumerating the stub's continuations; r = addition_steps' verifier."""
    if prefix.endswith("$"):
        return AdditionStepsTask().verify(prefix[:-1], a=3, b=4)
    return sum(p * exact_value(prefix + c) for c, p in law(prefix).items())


def _prefixes() -> list[str]:
    out, todo = [], [""]
    while todo:
        pre = todo.pop()
        out.append(pre)
        if not pre.endswith("$"):
            todo += [pre + c for c in law(pre)]
    return sorted(out)


class StubLM:
    """A causal LM with the hand-set law above; its last hidden state at position i is the one-hot of the
    completion prefix up to i (prompt positions and unknown prefixes share one slot)."""

    def __init__(self):
        self.slots = {pre: i for i, pre in enumerate(_prefixes())}  # 15 prefixes
        self.config = SimpleNamespace(hidden_size=len(self.slots) + 1, vocab_size=len(TOK))

    def _text(self, ids: list[int]) -> str:
        return "".join(CHAR[t] for t in ids)

    def __call__(self, input_ids, output_hidden_states=False, use_cache=False, **_):
        n, length = input_ids.shape
        p = len(PROMPT)
        logits = torch.full((n, length, len(TOK)), -1e9)
        hidden = torch.zeros((n, length, self.config.hidden_size))
        for r in range(n):
            for i in range(p - 1, length):
                pre = self._text(input_ids[r, p:i + 1].tolist())
                hidden[r, i, self.slots.get(pre, len(self.slots))] = 1.0
                if pre in self.slots and not pre.endswith("$"):
                    for c, q in law(pre).items():
                        logits[r, i, ID[c]] = torch.tensor(q).log()
        return SimpleNamespace(logits=logits, hidden_states=(hidden,))


def oracle_value(completions, hidden, last) -> torch.Tensor:
    return torch.tensor([exact_value(StubLM()._text(list(c))) for c in completions])


def _search(value, *, k=4, budget=10, lam=1.0, seed=0):
    return q_step_search(StubLM(), PROMPT, value=value, score=lambda h, logp: lam * h, k=k, max_expansions=budget,
                         max_new_tokens=8, delimiters=DELIMS, eos_id=EOS, pad_id=TOK.pad_token_id,
                         generator=torch.Generator().manual_seed(seed))


def test_stub_oracle_values_by_hand():
    # "7c0>": the answer copies 7 w.p. .8 -> .8; "6c0>": copies 6 w.p. .8, so right w.p. .2; root: .75*.8 + .25*.2 = .65
    assert exact_value("7c0>") == pytest.approx(0.8) and exact_value("6c0>") == pytest.approx(0.2)
    assert exact_value("") == pytest.approx(0.65)
    assert exact_value("7c0>7$") == 1.0 and exact_value("6c0>7$") == 1.0 and exact_value("7c0>6$") == 0.0


def test_propose_steps_stops_at_delimiters_and_eos():
    gen = torch.Generator().manual_seed(0)
    steps, used = propose_steps(StubLM(), PROMPT, k=4, delimiters=DELIMS, eos_id=EOS, pad_id=TOK.pad_token_id,
                                max_tokens=8, generator=gen)
    texts = sorted(StubLM()._text(list(s.tokens)) for s in steps)
    assert set(texts) <= {"6c0>", "7c0>"} and len(texts) == len(set(texts))  # distinct, closed by ">"
    assert used == 16  # 4 draws x 4 tokens, duplicates counted
    s = steps[0]
    first = torch.tensor(law("")[TOK.decode([s.tokens[0]])]).log().item()  # log .75 or log .25
    assert s.logps[1:] == (0.0, 0.0, 0.0) and s.logps[0] == pytest.approx(first)  # "c0>" are certain
    ctx = torch.cat([PROMPT, torch.tensor(TOK.convert_tokens_to_ids(list("7c0>")))])
    final, _ = propose_steps(StubLM(), ctx, k=3, delimiters=DELIMS, eos_id=EOS, pad_id=TOK.pad_token_id,
                             max_tokens=8, generator=gen)
    assert all(s.ends and len(s.tokens) == 2 for s in final)  # answer digit + EOS
    trunc, _ = propose_steps(StubLM(), PROMPT, k=2, delimiters=DELIMS, eos_id=EOS, pad_id=TOK.pad_token_id,
                             max_tokens=2, generator=gen)
    assert all(len(s.tokens) == 2 and not s.ends for s in trunc)  # cut by the token budget


def test_step_ends_and_examples_by_hand():
    ids = torch.tensor([[ID[c] for c in "7c0>7$"], [ID[c] for c in "6c0"] + [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ends = step_ends(ids, mask, delimiters=DELIMS)
    # row 0: ">" at 3 and EOS (last) at 5; row 1: truncated, its last token (2) closes the step
    assert ends.tolist() == [[False, False, False, True, False, True], [False, False, True, False, False, False]]
    states = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    data = step_examples(ids, mask, torch.tensor([1.0, 0.0]), states, delimiters=DELIMS)
    assert data.hidden.squeeze(-1).tolist() == [3.0, 5.0, 8.0] and data.rewards.tolist() == [1.0, 1.0, 0.0]
    assert data.tokens.tolist() == [TOK.convert_tokens_to_ids(">"), EOS, TOK.convert_tokens_to_ids("0")]


@functools.lru_cache(maxsize=1)
def test_rollout_labels_by_hand():
    r = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert rollout_labels(r, kind="mean").tolist() == [0.5, 0.0, 1.0]  # 2/4, 0/4, 4/4
    assert rollout_labels(r, kind="max").tolist() == [1.0, 0.0, 1.0]  # Q*'s best of the roll-outs
    with pytest.raises(ValueError, match="mean, max"):
        rollout_labels(r, kind="median")


def _learned_stub_head(samples=400):
    """Roll out the stub, split into steps, fit the step-Q head; returns (head, data)."""
    stub, gen = StubLM(), torch.Generator().manual_seed(1)
    rows = []
    for _ in range(samples):
        text = ""
        while not text.endswith("$"):
            cs, ps = zip(*law(text).items())
            text += cs[int(torch.multinomial(torch.tensor(ps), 1, generator=gen))]
        rows.append([ID[c] for c in text])
    ids = torch.tensor(rows)  # [N, 6] every completion has 6 tokens
    rewards = torch.tensor([exact_value(stub._text(r)) for r in rows])  # final outcome, 0 or 1
    states = stub(input_ids=torch.cat([PROMPT.repeat(samples, 1), ids], 1), output_hidden_states=True)
    states = states.hidden_states[-1][:, len(PROMPT) - 1:-1]  # [N, 6, H] state before token t
    data = step_examples(ids, torch.ones_like(ids), rewards, states, delimiters=DELIMS)
    head = QHead(stub.config.hidden_size, stub.config.vocab_size)
    fit_head(head, data, epochs=150, lr=0.3)
    return head, data


def test_learned_step_q_recovers_the_exact_step_values():
    head, data = _learned_stub_head()
    value = head_step_value(head)
    gt = TOK.convert_tokens_to_ids(">")
    for pre, want in (("7c0", 0.8), ("6c0", 0.2)):  # state before ">" closes step 1
        h = StubLM()(input_ids=torch.cat([PROMPT, torch.tensor(TOK.convert_tokens_to_ids(list(pre)))])[None],
                     output_hidden_states=True).hidden_states[-1][:, -1]
        got = float(value([], h, torch.tensor([gt])).detach())
        rows = (data.hidden == h).all(-1) & (data.tokens == gt)
        emp = float(data.rewards[rows].mean())  # the label mean = the BCE minimiser for this one-hot state
        assert abs(got - emp) < 0.02  # the fit reaches the minimiser
        # Monte-Carlo error of the labels: ~300 (or ~100) roll-outs, sd sqrt(.16 / 100) = .04 at worst -> 2.5 sd
        assert abs(got - want) < 0.1, (pre, got, emp, want)


def test_search_with_the_exact_q_and_the_lm_proposer_solves_the_prompt():
    res = _search(oracle_value)
    # root -> {"7c0>" (.8), "6c0>" (.2)}; pop "7c0>" -> {"7$" (1), "6$" (0)}; pop "7c0>7$": 2 expansions
    assert StubLM()._text(list(res.tokens)) == "7c0>7$" and res.found and res.expansions == 2
    assert res.generated_tokens == 4 * 4 + 4 * 2  # 4 proposals of 4 tokens, then 4 of 2
    anti = _search(oracle_value, lam=-1.0)  # f = -Q: the search follows Q, here to the lowest-Q answer "6"
    assert StubLM()._text(list(anti.tokens)).endswith(">6$")


def test_search_with_the_learned_step_q_solves_the_prompt():
    head, _ = _learned_stub_head()
    res = _search(head_step_value(head))
    assert StubLM()._text(list(res.tokens)) == "7c0>7$" and res.found  # pi_ref alone is right w.p. .65


def test_search_budget_exhaustion_returns_the_best_generated_solution():
    res = _search(oracle_value, budget=1)
    assert not res.found and res.expansions == 1
    assert StubLM()._text(list(res.tokens)) == "7c0>"  # the best open node after the root's expansion
    res = _search(oracle_value, budget=2)  # "7c0>7$" was generated by the 2nd expansion but never popped
    assert not res.found and res.expansions == 2 and StubLM()._text(list(res.tokens)) == "7c0>7$"


@pytest.fixture(scope="module")
def pol(tiny_llama_dir):
    return load_policy(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def step_head_dir(tmp_path_factory, pol):
    items = sample_items(parse_mix("addition_steps:1"), split="train", start=0, count=4)
    head, stats = train_step_q(pol, items, samples=2, max_new_tokens=8, epochs=5)
    assert stats["examples"] >= 8  # >= one step per completion
    d = tmp_path_factory.mktemp("stepq")
    save_q_head(head, d, tokenizer=pol.tokenizer, base_model="tiny", info=stats)
    return d


def test_step_rollout_labels_on_a_causal_lm(pol):
    items = sample_items(parse_mix("addition_steps:1"), split="train", start=0, count=3)
    delims = delimiter_ids(pol.tokenizer, ",>")
    own = collect_step_data(pol, items, samples=2, delimiters=delims, max_new_tokens=6,
                            generator=torch.Generator().manual_seed(0))
    rolled = collect_step_data(pol, items, samples=2, delimiters=delims, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(0), rollouts=3, label="max")
    # same completions (same seed, roll-outs drawn after them): same steps, states and tokens
    assert torch.equal(own.tokens, rolled.tokens) and torch.allclose(own.hidden, rolled.hidden)
    finished = own.tokens == pol.eos_id  # a step closed by EOS keeps its own reward
    assert torch.equal(own.rewards[finished], rolled.rewards[finished])
    assert set(rolled.rewards.tolist()) <= {0.0, 1.0}  # max of {0, 1} rewards
    with pytest.raises(ValueError, match="mean, max"):
        collect_step_data(pol, items, samples=1, delimiters=delims, max_new_tokens=4,
                          generator=torch.Generator(), rollouts=2, label="best")


def test_step_rollouts_continue_each_step_and_average_its_rewards(pol, monkeypatch):
    """With a fake verifier (reward = 1 iff the text has an even length) every roll-out text extends its step's
    prefix, and the live steps' labels are the means of their roll-outs' rewards, in order."""
    import tilt.rewards

    calls = []

    def fake(prompts, completions, **_):
        calls.append(list(completions))
        return [float(len(c) % 2 == 0) for c in completions]

    monkeypatch.setattr(tilt.rewards, "verifier_reward", fake)
    items = sample_items(parse_mix("addition_steps:1"), split="train", start=0, count=3)
    k = 3
    data = collect_step_data(pol, items, samples=2, delimiters=delimiter_ids(pol.tokenizer, "0123456789abcdefghijkl"),
                             max_new_tokens=6, generator=torch.Generator().manual_seed(0), rollouts=k, label="mean")
    sampled, rolled = calls
    groups = [rolled[i:i + k] for i in range(0, len(rolled), k)]
    assert len(sampled) == 6 and len(groups) >= 3  # 3 items x 2 samples; many chars end a step, so live steps exist
    for g in groups:
        prefix = min(g, key=len)[:1]  # every step has >= 1 token, so the roll-outs share >= 1 char with a sample
        assert all(t.startswith(prefix) for t in g) and any(c.startswith(prefix) for c in sampled)
        assert all(len(t) <= 6 for t in g)  # prefix + continuation cut at the completion budget
    means = [sum(len(t) % 2 == 0 for t in g) / k for g in groups]
    labels, j = data.rewards.tolist(), 0
    for v in labels:  # the group means appear in order among the labels
        if j < len(means) and abs(v - means[j]) < 1e-6:
            j += 1
    assert j == len(means)


def test_q_search_decoder_on_a_causal_lm(pol, step_head_dir):
    dec = Decoding.build("q_search", {"k": 2, "max_expansions": 3}, value_model=str(step_head_dir), model=pol.model,
                         tokenizer=pol.tokenizer)
    ids, mask = encode_prompts(pol.tokenizer, ["st 3+4=", "st 12+5="])  # left-padded: the first row is shorter
    batch, ref = dec.generate(pol.model, ids, mask, max_new_tokens=6, eos_id=pol.eos_id, pad_id=pol.pad_id,
                              generator=torch.Generator().manual_seed(0))
    assert ref is None and batch.completion_ids.shape[0] == 2
    lengths = batch.completion_mask.sum(-1)
    assert bool((lengths >= 1).all() and (lengths <= 6).all())
    assert dec.generated_tokens >= int(lengths.sum())  # proposals include the kept tokens
    assert bool((batch.logprobs <= 0).all())  # pi_ref log-probs of the kept tokens
    items = eval_items(parse_mix("addition_steps:1"), per_cell=2)
    res = evaluate_items(pol.model, pol.tokenizer, items, n_samples=1, max_new_tokens=6, decoding=dec)
    assert all(len(r.sample_rewards) == 1 for r in res)


def test_q_search_from_tilt_train_value_and_tilt_eval(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    tv = runner.invoke(app, ["train-value", str(tiny_llama_dir), "--steps", "--tasks", "addition_steps:1", "--prompts",
                             "3", "--step-samples", "2", "--step-rollouts", "2", "--step-label", "max", "--epochs", "3",
                             "--max-new-tokens", "6",
                             "--out", str(tmp_path / "vm")])
    assert tv.exit_code == 0, tv.output
    meta = json.loads((tmp_path / "vm" / "q_head.json").read_text())
    assert meta["kind"] == "step_q" and meta["delimiters"] == ",>" and meta["examples"] >= 6
    assert meta["rollouts"] == 2 and meta["label"] == "max"
    ev = runner.invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "addition_steps:1", "--per-cell", "2",
                             "--n", "1", "--max-new-tokens", "6", "--decode", "q_search", "--decode-kwargs",
                             '{"k": 2, "max_expansions": 2}', "--value-model", str(tmp_path / "vm"),
                             "--out", str(tmp_path / "e.json")])
    assert ev.exit_code == 0, ev.output
    assert json.loads((tmp_path / "e.json").read_text())["decode"]["name"] == "q_search"
    dec = runner.invoke(app, ["decode", str(tiny_llama_dir), "--tasks", "addition_steps:1", "--per-cell", "2",
                              "--max-new-tokens", "6", "--decode", "q_search", "--decode-kwargs", '{"k": 2}',
                              "--value-model", str(tmp_path / "vm"), "--out", str(tmp_path / "c.jsonl")])
    assert dec.exit_code == 0, dec.output
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["decoder"] == "q_search" and lines[0]["kl_to_ref"] is None
    pic = runner.invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "addition_steps:1", "--per-cell", "2", "--n", "1",
                              "--max-new-tokens", "6", "--decoders", "sample,q_search:k=3,max_expansions=2",
                              "--value-model", str(tmp_path / "vm"), "--out", str(tmp_path / "pic" / "e.json")])
    assert pic.exit_code == 0, pic.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "pic" / "decoders.json").read_text())}
    assert rows["sample"]["kl"] == 0.0 and rows["q_search"]["kl"] is None  # search: no tractable log q
    # every proposed step counts: >= the kept tokens (3 proposals per expansion)
    assert rows["q_search"]["tokens_per_prompt"] >= rows["q_search"]["kept_tokens_per_prompt"] > 0


def test_q_search_bad_input(pol, step_head_dir):
    kw = dict(value_model=str(step_head_dir), model=pol.model, tokenizer=pol.tokenizer)
    with pytest.raises(ValueError, match="k >= 1"):
        Decoding.build("q_search", {"k": 0}, **kw)
    with pytest.raises(ValueError, match="max_expansions >= 1"):
        Decoding.build("q_search", {"max_expansions": 0}, **kw)
    with pytest.raises(ValueError, match="delimiters"):
        Decoding.build("q_search", {"delimiters": ""}, **kw)
    with pytest.raises(ValueError, match="no token"):
        Decoding.build("q_search", {"delimiters": "\u2603"}, **kw)
    with pytest.raises(ValueError, match="do not fit decoder"):
        Decoding.build("q_search", {"beam": 3}, **kw)
    with pytest.raises(ValueError, match="needs a value model"):
        Decoding.build("q_search", {"k": 2}, model=pol.model, tokenizer=pol.tokenizer)
    with pytest.raises(ValueError, match="samples >= 1"):
        train_step_q(pol, [], samples=0)
    with pytest.raises(ValueError, match="rollouts >= 0"):
        train_step_q(pol, [], rollouts=-1)
