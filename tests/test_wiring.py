"""Values of the providers (tilt.providers) and the wiring (tilt.wiring), worked out by hand."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tilt.batch import RolloutBatch
from tilt.learner import LearnerBatch
from tilt.model import load_policy
from tilt.rollout import SamplingParams, left_pad
from tilt.tasks import get_task
from tilt.tasks.mix import sample_items
from tilt.wiring.sampling import Scored, TrainStream, merge_scored
from tilt.selection.pf_ppo import pf_filter_batch
from tilt.wiring.selection import SelectContext
from tilt.providers.probe import gae_returns
from tilt.providers.process import char_to_token, process_steps
from tilt.providers.rollouts import astar_baseline, spo_values


def scored(tok, items, texts, rewards, group_size=1) -> Scored:
    """A Scored batch of given completion texts (each + EOS), one row per text."""
    eos = tok.eos_token_id
    prompts = [it.prompt for it in items for _ in range(group_size)]
    p_ids, p_mask = left_pad([tok(p).input_ids for p in prompts], tok.pad_token_id)
    rows = [tok(t, add_special_tokens=False).input_ids + [eos] for t in texts]
    T = max(len(r) for r in rows)
    c_ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    c_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    rb = RolloutBatch(p_ids, p_mask, c_ids, c_mask, torch.zeros(c_ids.shape))
    cols = {"task": [it.task for it in items for _ in range(group_size)],
            "difficulty": [it.difficulty for it in items for _ in range(group_size)],
            "columns": [it.columns for it in items for _ in range(group_size)]}
    return Scored(list(items), group_size, prompts, rb, list(texts), cols, torch.tensor(rewards), {}, [])


def test_process_steps_map_step_rewards_and_ends_to_tokens(char_tok):
    steps_item = get_task("addition_steps").generate(1_000_000, 2)
    a, b = steps_item.columns["a"], steps_item.columns["b"]
    # a correct first column, a wrong carry in the second, the right sum:
    d0 = (a % 10 + b % 10) % 10
    c0 = (a % 10 + b % 10) // 10
    d1 = (a // 10 + b // 10 + c0) % 10
    c1 = (a // 10 + b // 10 + c0) // 10
    text = f"{d0}c{c0},{d1}c{1 - c1}>{a + b}"
    plain = get_task("addition").generate(1_000_000, 1)
    sc = scored(char_tok, [steps_item, plain], [text, "12"], [1.0, 0.0])
    pol = SimpleNamespace(tokenizer=char_tok, eos_id=char_tok.eos_token_id, pad_id=char_tok.pad_token_id)
    out = process_steps(pol, sc)
    # row 0: steps "dcc" (chars 0-2) right -> 1, "dcc" (chars 4-6) wrong carry -> 0, answer right -> 1,
    # closed at chars 2, 6 and len(text) - 1; one char per token, so the token indices are the same.
    assert out["step_rewards"][0].tolist() == [1.0, 0.0, 1.0]
    assert out["step_ends"][0].tolist() == [2, 6, len(text) - 1]
    # row 1 (a task without steps): one step = the outcome reward 0.0, closed at its last token
    # (EOS, index 2 after "1", "2"); the other slots are padding.
    assert out["step_rewards"][1, 0].item() == 0.0 and math.isnan(out["step_rewards"][1, 1].item())
    assert out["step_ends"][1].tolist() == [2, -1, -1]


def test_char_to_token_counts_decoded_characters(char_tok):
    ids = char_tok("ab", add_special_tokens=False).input_ids + [char_tok.eos_token_id]
    assert char_to_token(char_tok, ids, char_tok.eos_token_id) == [1, 2, 2]  # EOS adds no character


def test_train_stream_reads_the_split_in_order():
    s = TrainStream("addition:1,sorting:1", offset=5)
    got = s.take(3) + s.take(2)
    assert s.pos == 5 and got == sample_items("addition:1,sorting:1", split="train", start=5, count=5)


def test_merge_scored_repads_prompts_left_and_completions_right(char_tok):
    items = [get_task("addition").generate(1_000_000, 1), get_task("addition").generate(1_000_001, 2)]
    g1 = scored(char_tok, items[:1], ["1"], [1.0])
    g2 = scored(char_tok, items[1:], ["123"], [0.0])
    m = merge_scored([g1, g2], pad_id=char_tok.pad_token_id)
    p1, p2 = (char_tok(it.prompt).input_ids for it in items)
    P = max(len(p1), len(p2))
    assert m.rb.prompt_ids.shape == (2, P) and m.rb.prompt_ids[0, P - len(p1):].tolist() == p1
    assert m.rb.prompt_mask[0].tolist() == [0] * (P - len(p1)) + [1] * len(p1)
    # completions: "1"+EOS padded to "123"+EOS's 4 tokens
    assert m.rb.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert m.rb.completion_ids[0, 2:].tolist() == [char_tok.pad_token_id] * 2
    assert m.rewards.tolist() == [1.0, 0.0] and m.texts == ["1", "123"] and m.items == items


def test_gae_returns_by_hand():
    rewards = torch.tensor([[1.0]])  # [B=1, G=1]
    values = torch.tensor([[[0.5, 0.25]]])  # [1, 1, T=2]
    mask = torch.ones(1, 1, 2)
    # gamma = lam = 1: R_t = sum of future rewards = [1, 1]
    assert gae_returns(rewards, values, mask, None, gamma=1.0, lam=1.0).tolist() == [[[1.0, 1.0]]]
    # lam = 0: delta_1 = 1 + 0 - 0.25 = 0.75 -> R_1 = 0.75 + 0.25 = 1.0;
    #          delta_0 = 0 + 0.25 - 0.5 = -0.25 -> R_0 = -0.25 + 0.5 = 0.25
    assert gae_returns(rewards, values, mask, None, gamma=1.0, lam=0.0).tolist() == [[[0.25, 1.0]]]


def test_astar_baseline_is_soft_value_of_each_prompts_samples(tiny_llama_dir, char_tok):
    pol = load_policy(str(tiny_llama_dir))
    items = [get_task("addition").generate(1_000_000 + k, 1) for k in range(2)]
    sc = scored(char_tok, items, ["1", "2", "3", "4"], [0.0] * 4, group_size=2)
    seen = []

    def rewards_fn(prompts, texts, columns):
        seen.extend(prompts)
        return torch.tensor([1.0, 0.0, 0.0] * (len(prompts) // 3))

    v = astar_baseline(pol.model, pol, sc, samples=3, beta=1.0, params=SamplingParams(4),
                       rewards_fn=rewards_fn, generator=torch.Generator().manual_seed(0))
    # per prompt: rewards (1, 0, 0) -> V* = 1 * log((e + 1 + 1) / 3) = log(4.718282 / 3) = 0.452832
    assert v.tolist() == pytest.approx([0.452832] * 4, abs=1e-6)
    assert seen == [items[0].prompt] * 3 + [items[1].prompt] * 3


def test_spo_values_are_mean_rewards_of_prefix_continuations(tiny_llama_dir, char_tok):
    pol = load_policy(str(tiny_llama_dir))
    items = [get_task("addition").generate(1_000_000, 1)]
    sc = scored(char_tok, items, ["12345"], [0.0])
    sc.rb.logprobs[:] = math.log(0.5)  # every token is a cutpoint (prob 0.5 < 0.9)
    calls = []

    def rewards_fn(prompts, texts, columns):
        calls.extend(texts)
        return torch.tensor([float(len(t)) for t in texts])

    out = spo_values(pol, sc, params=SamplingParams(8), k=2, threshold=0.9, max_segments=3,
                     rewards_fn=rewards_fn, generator=torch.Generator().manual_seed(0))
    # 6 tokens ("12345" + EOS), 6 cutpoints, 3 segments: per = ceil(6 / 3) = 2 -> ends at ranks 2, 4
    # (token indices 1, 3) and the last token 5.
    assert out["step_ends"][0].tolist() == [1, 3, 5]
    # continuations from "12" (2 of them) and "1234" (2): every text starts with its prefix, and
    # values at the ends are the mean reward (= text length) of those 2 texts.
    assert len(calls) == 4 and all(t.startswith("12") for t in calls[:2]) and all(t.startswith("1234") for t in calls[2:])
    assert out["values"][0, 1].item() == pytest.approx((len(calls[0]) + len(calls[1])) / 2)
    assert out["values"][0, 3].item() == pytest.approx((len(calls[2]) + len(calls[3])) / 2)
    assert all(len(t) <= 8 for t in calls)  # a continuation stays within the generation budget
    assert out["values"][0, [0, 2, 4, 5]].abs().sum().item() == 0.0


def test_pf_ppo_filter_keeps_the_strategys_rows():
    N, T = 8, 3
    batch = LearnerBatch(prompt_ids=torch.zeros(N, 2, dtype=torch.long), prompt_mask=torch.ones(N, 2, dtype=torch.long),
                         completion_ids=torch.zeros(N, T, dtype=torch.long), completion_mask=torch.ones(N, T, dtype=torch.long),
                         old_logp=torch.zeros(N, T), advantages=torch.arange(N).float()[:, None].expand(N, T).clone(),
                         rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
                         group_index=torch.arange(2).repeat_interleave(4))
    ctx = SelectContext(adv=torch.zeros(2, 4, T), rewards=batch.rewards.view(2, 4), entropy=None, step=1,
                        generator=torch.Generator())
    out, m = pf_filter_batch(batch, ctx, strategy="best_of_n")
    # best_of_n: group 0's argmax is index 1 (row 1); group 1 ties at 0 and 3, the first wins (row 4)
    assert out.advantages[:, 0].tolist() == [1.0, 4.0] and out.group_index.tolist() == [0, 1]
    assert m["select/samples_kept"] == 0.25  # 2 of 8
