"""reasoning-gym as a data source: rows, disjoint recorded seeds, its own score_answer, clear errors."""
from __future__ import annotations

import pytest

from tilt.config import ConfigError
from tilt.rewards import resolve_reward_fn, score
from tilt.tasks.base import SEED_RANGES
from tilt.verifiers.reasoning_gym_source import extract_answer, reasoning_gym_rows
from tilt.verifiers.tasks import ReasoningGymTask

SMALL = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


def test_rows_have_prompt_answer_metadata_and_correct_answers():
    rows = reasoning_gym_rows("chain_sum", split="train", size=8, **SMALL)
    for r in rows:
        assert set(r) == {"prompt", "answer", "metadata"}
        expr = r["metadata"]["expression"]  # e.g. "0 - 2": two one-digit terms
        assert r["prompt"].endswith(f"{expr} =")
        assert int(r["answer"]) == eval(expr)  # the generator's answer is the arithmetic value
        assert r["metadata"]["rg_kwargs"] == SMALL and r["metadata"]["rg_generator"] == "chain_sum"


def test_train_and_eval_seeds_are_disjoint_and_recorded():
    train = reasoning_gym_rows("chain_sum", split="train", size=50, seed=3, **SMALL)
    evals = reasoning_gym_rows("chain_sum", split="eval", size=50, seed=3, **SMALL)
    ts = [r["metadata"]["rg_item_seed"] for r in train]
    es = [r["metadata"]["rg_item_seed"] for r in evals]
    # item i of split s has seed SEED_RANGES[s][0] + seed + i: 1_000_003..1_000_052 and 1_000_000_003..
    assert ts == list(range(1_000_003, 1_000_053)) and es == list(range(1_000_000_003, 1_000_000_053))
    assert not set(ts) & set(es)
    assert all(SEED_RANGES["train"][0] <= s < SEED_RANGES["train"][1] for s in ts)
    # the same arguments give the same rows (reproducible)
    assert reasoning_gym_rows("chain_sum", split="train", size=50, seed=3, **SMALL) == train


def test_reward_is_the_generators_own_score_answer():
    rows = reasoning_gym_rows("chain_sum", split="eval", size=3, **SMALL)
    right = rows[0]["answer"]
    wrong = str(int(rows[1]["answer"]) + 1)
    comps = [right, f"<think>sum</think><answer>{wrong}</answer>", f"<answer>{rows[2]['answer']}</answer>"]
    fn = resolve_reward_fn("reasoning_gym")
    cols = {"answer": [r["answer"] for r in rows], "metadata": [r["metadata"] for r in rows]}
    r, counts, msgs = score([fn], [1.0], [x["prompt"] for x in rows], comps, cols, timeout=60)
    assert r == [1.0, 0.0, 1.0] and not msgs
    assert extract_answer("a <answer> 1 </answer> b <answer>2</answer>") == "2"


def test_as_a_task_with_tilt_seeds():
    task = ReasoningGymTask("chain_sum", SMALL, prompt_fn=str.lower)  # one level, difficulty 1
    item = task.generate(SEED_RANGES["eval"][0] + 7, 1)
    assert item.task == "rg_chain_sum" and item.prompt == item.prompt.lower()
    assert item.columns["metadata"]["rg_item_seed"] == 1_000_000_007
    assert task.verify(item.answer, **item.columns) == 1.0
    assert task.verify("nonsense", **item.columns) == 0.0
    assert task.generate(item.seed, 1) == item  # deterministic


def test_unknown_generator_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown reasoning-gym generator 'chain_summ'; valid names: .*chain_sum"):
        reasoning_gym_rows("chain_summ", size=2)


def test_bad_kwargs_and_split_are_config_errors():
    with pytest.raises(ConfigError, match="'chain_sum' rejected kwargs"):
        reasoning_gym_rows("chain_sum", size=2, bogus=1)
    with pytest.raises(ConfigError, match="split must be 'train' or 'eval'"):
        reasoning_gym_rows("chain_sum", split="test", size=2)


def test_registered_rg_chain_sum_task():
    from tilt.tasks import get_task

    task = get_task("rg_chain_sum")
    item = task.generate(SEED_RANGES["train"][0] + 11, 2)
    expr = item.columns["metadata"]["expression"]  # e.g. "42 + 69": two two-digit terms
    assert item.prompt == expr.replace(" ", "") + "=" and int(item.answer) == eval(expr)
    assert all(10 <= abs(int(t)) <= 99 for t in expr.replace("+", " ").replace(" - ", " ").split())
    assert task.verify(item.answer, **item.columns) == 1.0 and task.verify("x", **item.columns) == 0.0
    import json
    json.dumps(item.columns)  # columns stay JSON-serialisable (reasoning-gym's tuples became lists)


def test_data_source_reasoning_gym_builds_disjoint_recorded_rows_scored_by_score_answer(char_tok):
    """data.source=reasoning_gym: seed 2 with size 5 trains on item seeds 1_000_000 + 2*5 + i,
    i < 5 (1_000_010..1_000_014); every seed evaluates on 1_000_000_000..1_000_000_002."""
    from tilt.config import load_config
    from tilt.data import build_source

    cfg = load_config(None, ["seed=2", "data.source=reasoning_gym", "data.allow_contaminated=false",
                             "data.kwargs={generator: chain_sum, size: 5, eval_size: 3, min_terms: 2, max_terms: 2, "
                             "min_digits: 1, max_digits: 1}"])
    src = build_source(cfg, char_tok)
    train, held = src.train_items(0, 5), src.eval_items()
    assert sorted(it.seed for it in train) == list(range(1_000_010, 1_000_015))
    assert [it.seed for it in held] == [1_000_000_000, 1_000_000_001, 1_000_000_002]
    report = src.report(0, 5)["dataset"]
    assert "[1000010, 1000015)" in report["train"] and "[1000000000, 1000000003)" in report["eval"]
    it = held[0]
    cols = {k: [v] for k, v in it.reward_columns().items()}
    right, _, _ = score([resolve_reward_fn("reasoning_gym")], [1.0], [it.prompt], [it.answer], cols, timeout=30)
    wrong, _, _ = score([resolve_reward_fn("reasoning_gym")], [1.0], [it.prompt], ["nonsense"], cols, timeout=30)
    assert right == [1.0] and wrong == [0.0]


def test_data_source_reasoning_gym_bad_input_is_clear(char_tok):
    from tilt.config import load_config
    from tilt.data import build_source

    with pytest.raises(ConfigError, match="needs data.kwargs.generator, one of: .*chain_sum"):
        build_source(load_config(None, ["data.source=reasoning_gym"]), char_tok)
    with pytest.raises(ConfigError, match="unknown reasoning-gym generator 'chain_summ'; valid names: .*chain_sum"):
        build_source(load_config(None, ["data.source=reasoning_gym", "data.kwargs={generator: chain_summ}"]), char_tok)
    with pytest.raises(ConfigError, match="data.kwargs.size must be a positive integer, got 0"):
        build_source(load_config(None, ["data.source=reasoning_gym", "data.kwargs={generator: chain_sum, size: 0}"]),
                     char_tok)
