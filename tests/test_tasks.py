"""Tests for the task suite (tilt/tasks): generation, verifiers, mixes and seed ranges (G3)."""
from __future__ import annotations

import json
import operator
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilt.registry import UnknownNameError
from tilt.tasks import SEED_RANGES, TASKS, get_task
from tilt.tasks.countdown import parse_expression, render
from tilt.tasks.mix import eval_items, eval_seed, parse_mix, sample_items, seed_report

NAMES = ["addition", "countdown", "multiplication", "sorting"]
ALLOWED = set("0123456789abcdefghijklmnopqrstuvwxyz +-*=():>,")
SEEDS = st.integers(min_value=0, max_value=2_000_000_000)
DIFFS = st.sampled_from([1, 2, 3])
FAST = settings(max_examples=200, deadline=None)
FEW = settings(max_examples=60, deadline=None)

# ---------------------------------------------------------------- the test's own evaluator
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def tree_value(tree) -> int:
    """Value of (op, left, right) / int trees, independent of tilt's parser and evaluator."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    return OPS[op](tree_value(left), tree_value(right))


def full_parens(tree) -> str:
    """Every operation wrapped in parentheses, e.g. ((3*5)+7)."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    return f"({full_parens(left)}{op}{full_parens(right)})"


def commute(tree):
    """Swap the operands of every + and * node: same value, different text."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    left, right = commute(left), commute(right)
    return (op, right, left) if op in "+*" else (op, left, right)


def draw_tree(data, leaves):
    if len(leaves) == 1:
        return leaves[0]
    k = data.draw(st.integers(1, len(leaves) - 1))
    op = data.draw(st.sampled_from("+-*"))
    return (op, draw_tree(data, leaves[:k]), draw_tree(data, leaves[k:]))


def draw_subset_tree(data, numbers):
    """A random expression tree over a random sub-multiset of ``numbers`` (each used once)."""
    order = data.draw(st.permutations(numbers))
    return draw_tree(data, order[: data.draw(st.integers(1, len(order)))])


# ---------------------------------------------------------------- registry
def test_registry_holds_the_four_tasks_under_their_own_names():
    # + the step-wise task of C4 and the ecosystem tasks of tilt/verifiers/tasks.py
    assert TASKS.names() == sorted(NAMES + ["addition_steps", "rg_chain_sum", "code_mul"])
    for name in NAMES:
        task = get_task(name)
        assert task.name == name and tuple(task.difficulties) == (1, 2, 3)
        assert TASKS.entry(name).meta["difficulties"] == (1, 2, 3)


def test_unknown_task_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: addition, addition_steps, code_mul, countdown, multiplication, rg_chain_sum, sorting"):
        get_task("divison")


@pytest.mark.parametrize("name", NAMES)
def test_bad_difficulty_or_seed_type_is_a_clear_error(name):
    task = get_task(name)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"unknown difficulty {bad}; valid difficulties: 1, 2, 3"):
            task.generate(5, bad)
    with pytest.raises(TypeError, match="must be integers"):
        task.generate(5, 1.5)
    # numpy ints name the same item as python ints (the seed string is "task:2:5" either way)
    assert task.generate(np.int64(5), np.int64(2)) == task.generate(5, 2)


# ---------------------------------------------------------------- every task, every difficulty
@pytest.mark.parametrize("name", NAMES)
@FAST
@given(seed=SEEDS, difficulty=DIFFS)
def test_reference_verifies_deterministic_and_allowed_characters(name, seed, difficulty):
    task = get_task(name)
    item = task.generate(seed, difficulty)
    assert (item.task, item.difficulty, item.seed) == (name, difficulty, seed)
    assert task.verify(item.answer, **item.columns) == 1.0
    assert task.generate(seed, difficulty) == item
    assert set(item.prompt) <= ALLOWED and set(item.answer) <= ALLOWED
    json.dumps(item.columns)  # columns must be JSON-serialisable


def test_generation_is_identical_across_processes_and_hash_seeds():
    code = ("from tilt.tasks import get_task\n"
            "print([get_task(n).generate(s, d).prompt for n in %r for s in (0, 7) for d in (1, 2, 3)])"
            % NAMES)
    here = [get_task(n).generate(s, d).prompt for n in NAMES for s in (0, 7) for d in (1, 2, 3)]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == repr(here)


@FAST
@given(seed=SEEDS, difficulty=DIFFS)
def test_addition_shape(seed, difficulty):
    item = get_task("addition").generate(seed, difficulty)
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", item.prompt).groups()
    assert len(a) == len(b) == difficulty  # d digits each, no leading zeros
    assert str(int(a)) == a and str(int(b)) == b
    assert item.answer == str(int(a) + int(b)) and item.columns == {"answer": item.answer}


@FAST
@given(seed=SEEDS, difficulty=DIFFS)
def test_multiplication_shape(seed, difficulty):
    item = get_task("multiplication").generate(seed, difficulty)
    a, b = re.fullmatch(r"(\d+)\*(\d+)=", item.prompt).groups()
    assert (len(a), len(b)) == {1: (1, 1), 2: (2, 1), 3: (2, 2)}[difficulty]
    assert a[0] != "0" and b[0] != "0"  # no zero factor, no leading zero
    assert item.answer == str(int(a) * int(b)) and item.columns == {"answer": item.answer}


@FAST
@given(seed=SEEDS, difficulty=DIFFS)
def test_countdown_shape(seed, difficulty):
    item = get_task("countdown").generate(seed, difficulty)
    nums, target = re.fullmatch(r"cd (\d+(?: \d+)*)>(\d+):", item.prompt).groups()
    numbers = [int(x) for x in nums.split()]
    assert len(numbers) == difficulty + 1 and numbers == sorted(numbers)
    assert all(1 <= x <= (12 if difficulty <= 2 else 9) for x in numbers)
    assert 0 <= int(target) <= 999 and int(target) not in numbers
    assert item.columns == {"numbers": numbers, "target": int(target)}
    # the reference uses ALL the numbers, each once (multiset equality)
    assert sorted(int(x) for x in re.findall(r"\d+", item.answer)) == numbers
    assert len(item.answer) <= 40


@FAST
@given(seed=SEEDS, difficulty=DIFFS)
def test_sorting_shape(seed, difficulty):
    item = get_task("sorting").generate(seed, difficulty)
    numbers = [int(x) for x in re.fullmatch(r"sort (\d+(?: \d+)*):", item.prompt).group(1).split()]
    assert len(numbers) == difficulty + 2 and all(0 <= x <= 99 for x in numbers)
    assert item.answer == " ".join(str(x) for x in sorted(numbers))


# ---------------------------------------------------------------- verifiers are total
@pytest.mark.parametrize("name", NAMES)
@FAST
@given(text=st.text(max_size=60), seed=SEEDS, difficulty=DIFFS)
def test_verifier_is_total_on_arbitrary_text(name, text, seed, difficulty):
    task = get_task(name)
    reward = task.verify(text, **task.generate(seed, difficulty).columns)
    assert isinstance(reward, float) and 0.0 <= reward <= 1.0


@FAST
@given(text=st.text(alphabet="0123456789+-*() ", max_size=45), seed=SEEDS, difficulty=DIFFS)
def test_countdown_verifier_is_total_on_near_miss_expressions(text, seed, difficulty):
    task = get_task("countdown")
    assert task.verify(text, **task.generate(seed, difficulty).columns) in (0.0, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_non_string_completion_scores_zero(name):
    item = get_task(name).generate(3, 2)
    for junk in (None, 132, b"132", ["132"]):
        assert get_task(name).verify(junk, **item.columns) == 0.0


# ---------------------------------------------------------------- wrong answers score 0
@pytest.mark.parametrize("name", ["addition", "multiplication", "sorting"])
@FAST
@given(seed=SEEDS, difficulty=DIFFS, data=st.data())
def test_one_digit_changed_scores_zero(name, seed, difficulty, data):
    task = get_task(name)
    item = task.generate(seed, difficulty)
    pos = data.draw(st.sampled_from([i for i, c in enumerate(item.answer) if c.isdigit()]))
    digit = data.draw(st.sampled_from([d for d in "0123456789" if d != item.answer[pos]]))
    wrong = item.answer[:pos] + digit + item.answer[pos + 1:]
    assert task.verify(wrong, **item.columns) == 0.0
    assert task.verify(f"  {item.answer}\n", **item.columns) == 1.0  # surrounding whitespace ok


@FAST
@given(seed=SEEDS, difficulty=DIFFS, data=st.data())
def test_sorting_rewards_a_permutation_iff_it_is_ascending(seed, difficulty, data):
    task = get_task("sorting")
    item = task.generate(seed, difficulty)
    numbers = [int(x) for x in item.prompt[len("sort "):-1].split()]
    perm = data.draw(st.permutations(numbers))
    ascending = all(a <= b for a, b in zip(perm, perm[1:]))
    assert task.verify(" ".join(map(str, perm)), **item.columns) == float(ascending)


def test_hand_worked_exact_match():
    add, mul, srt = get_task("addition"), get_task("multiplication"), get_task("sorting")
    # 47+85: 7+5=12 write 2 carry 1; 4+8+1=13 -> 132
    assert add.verify("132", answer="132") == 1.0
    assert add.verify("122", answer="132") == 0.0  # forgot the carry
    assert add.verify("0132", answer="132") == 0.0  # no partial credit, no lenient parsing
    # 47*8: 7*8=56 write 6 carry 5; 4*8+5=37 -> 376
    assert mul.verify(" 376 ", answer="376") == 1.0 and mul.verify("37 6", answer="376") == 0.0
    # sort 53 7 21: 7 < 21 < 53
    assert srt.verify("7 21 53", answer="7 21 53") == 1.0
    assert srt.verify("7  21 53", answer="7 21 53") == 0.0  # single spaces only
    assert srt.verify("7,21,53", answer="7 21 53") == 0.0


# ---------------------------------------------------------------- pinned items (the eval sets)
@pytest.mark.parametrize("name, seed, difficulty, prompt, answer", [
    # 99+11: 9+1=10 write 0 carry 1; 9+1+1=11 -> 110
    ("addition", 1, 2, "99+11=", "110"),
    # 34*3: 4*3=12 write 2 carry 1; 3*3+1=10 -> 102
    ("multiplication", 0, 2, "34*3=", "102"),
    # 99*89 = 100*89 - 89 = 8900 - 89 = 8811
    ("multiplication", 0, 3, "99*89=", "8811"),
    # (5+4)*12 = 9*12 = 108
    ("countdown", 0, 2, "cd 4 5 12>108:", "(5+4)*12"),
    # 1-(2-4) = 1-(-2) = 3; the parentheses are needed under "-"
    ("countdown", 1, 2, "cd 1 2 4>3:", "1-(2-4)"),
    # 1-5+2*9: 2*9=18 first; 1-5=-4; -4+18=14
    ("countdown", 0, 3, "cd 1 2 5 9>14:", "1-5+2*9"),
    # 2 < 14 < 27 < 53 < 79
    ("sorting", 0, 3, "sort 53 27 2 14 79:", "2 14 27 53 79"),
])
def test_pinned_items_with_hand_checked_answers(name, seed, difficulty, prompt, answer):
    """Pins the generator streams: a change here silently changes every train and eval set."""
    item = get_task(name).generate(seed, difficulty)
    assert (item.prompt, item.answer) == (prompt, answer)
    assert get_task(name).verify(answer, **item.columns) == 1.0


# ---------------------------------------------------------------- countdown
CD = get_task("countdown")


def test_countdown_hand_worked_expressions():
    cols = {"numbers": [3, 5, 7], "target": 22}
    # 3*5+7 = 15+7 = 22; any other valid expression with value 22 also earns the reward
    for ok in ("3*5+7", "7+3*5", "5*3+7", "(3*5)+7", " 3 * 5 + 7 ", "((3)*(5))+7", "3*5+7\n"):
        assert CD.verify(ok, **cols) == 1.0, ok
    # (3+5)*7 = 56; 3*(5+7) = 36; 7-5*3 = 7-15 = -8; 3+5+7 = 15: none is 22
    for wrong in ("(3+5)*7", "3*(5+7)", "7-5*3", "3+5+7", ""):
        assert CD.verify(wrong, **cols) == 0.0, wrong


def test_countdown_precedence_and_left_associativity():
    # 2+3*4 = 2+12 = 14 (not (2+3)*4 = 20); 12-3-2 = 9-2 = 7 (not 12-(3-2) = 11)
    assert parse_expression("2+3*4") == (14, [2, 3, 4])
    assert parse_expression("12-3-2") == (7, [12, 3, 2])
    assert parse_expression("12-(3-2)") == (11, [12, 3, 2])
    # 2*3*4 = 24; (1+2)*(3+4) = 3*7 = 21
    assert parse_expression("2*3*4") == (24, [2, 3, 4])
    assert parse_expression("(1+2)*(3+4)") == (21, [1, 2, 3, 4])


@pytest.mark.parametrize("text, numbers, target, control", [
    ("3*5+8", [3, 5, 7], 23, [3, 5, 8]),  # 8 is not given; 15+8 = 23 would otherwise score
    ("5*5-3", [3, 5, 7], 22, [3, 5, 5, 7]),  # 5 used twice, given once; 25-3 = 22
    ("3*5+7+7", [3, 5, 7], 29, [3, 5, 7, 7]),  # 7 used twice; 15+7+7 = 29
    ("-3+7", [3, 7], 4, None),  # unary minus
    ("12/3", [3, 12], 4, None),  # division
    ("3**2", [2, 3], 9, None),  # power
    ("03*5+7", [3, 5, 7], 22, None),  # leading zero
    ("22", [3, 5, 7], 22, [22]),  # the bare target is a number not given
])
def test_countdown_rejects_forbidden_expressions(text, numbers, target, control):
    assert CD.verify(text, numbers=numbers, target=target) == 0.0
    if control is not None:  # with the right numbers the same text scores: it failed for the stated reason
        assert CD.verify(text, numbers=control, target=target) == 1.0


@pytest.mark.parametrize("text", [
    "__import__('os')", "__import__('os').system('true')", "3*5+7;import os", "3*5+7 # x",
    "0x16", "3*5+7=22", "3*5+7 and 1", "\uff13*5+7", "3*5\n+7", "3*5+7)", "(3*5+7", "3*5+", "()",
])
def test_countdown_rejects_injection_and_junk(text):
    assert CD.verify(text, numbers=[3, 5, 7], target=22) == 0.0


def test_countdown_rejects_more_than_40_characters():
    ok = "(" * 10 + "3*5" + ")" * 10 + "+7"  # 10+3+10+2 = 25 characters, value 22
    long = "(" * 20 + "3*5" + ")" * 20 + "+7"  # 20+3+20+2 = 45 characters, value 22
    assert (len(ok), len(long)) == (25, 45)
    assert CD.verify(ok, numbers=[3, 5, 7], target=22) == 1.0
    assert CD.verify(long, numbers=[3, 5, 7], target=22) == 0.0


@pytest.mark.parametrize("tree, text", [
    (("+", ("*", 3, 5), 7), "3*5+7"),  # (3*5)+7: * binds tighter, no parentheses
    (("*", ("+", 1, 2), 3), "(1+2)*3"),  # a lower-precedence left child needs them
    (("*", 3, ("-", 2, 1)), "3*(2-1)"),  # ... and so does a lower-precedence right child
    (("-", ("-", 7, 3), 2), "7-3-2"),  # left-associative: (7-3)-2 needs none
    (("-", 7, ("-", 3, 2)), "7-(3-2)"),  # 7-(3-2) = 6 but 7-3-2 = 2: needed
    (("-", 7, ("+", 3, 2)), "7-(3+2)"),  # 7-(3+2) = 2 but 7-3+2 = 6: needed
    (("+", 1, ("-", 2, 3)), "1+2-3"),  # 1+(2-3) = 0 = (1+2)-3: not needed
    (("*", 2, ("*", 3, 4)), "2*3*4"),  # 2*(3*4) = 24 = (2*3)*4: not needed
    (("-", 1, ("*", 2, 3)), "1-2*3"),  # 1-(2*3): * binds tighter
])
def test_render_uses_minimal_parentheses(tree, text):
    assert render(tree) == text


@FAST
@given(numbers=st.lists(st.integers(1, 12), min_size=1, max_size=4), data=st.data())
def test_render_then_parse_keeps_the_value_of_random_trees(numbers, data):
    tree = draw_tree(data, data.draw(st.permutations(numbers)))
    text = render(tree)
    assert parse_expression(text) == (tree_value(tree), [int(x) for x in re.findall(r"\d+", text)])
    assert parse_expression(full_parens(tree))[0] == tree_value(tree)


@FAST
@given(seed=SEEDS, difficulty=DIFFS, data=st.data())
def test_countdown_random_expression_verifies_iff_its_value_is_the_target(seed, difficulty, data):
    item = CD.generate(seed, difficulty)
    tree = draw_subset_tree(data, item.columns["numbers"])
    expected = float(tree_value(tree) == item.columns["target"])
    assert CD.verify(full_parens(tree), **item.columns) == expected
    assert CD.verify(render(commute(tree)), **item.columns) == expected


@FAST
@given(seed=SEEDS, difficulty=DIFFS, data=st.data())
def test_countdown_any_expression_reaching_the_target_earns_the_reward(seed, difficulty, data):
    """Take the target to be a random tree's own value: it and its commuted form both score 1,
    and the same texts score 0 against target + 1."""
    numbers = CD.generate(seed, difficulty).columns["numbers"]
    tree = draw_subset_tree(data, numbers)
    value = tree_value(tree)
    for text in (full_parens(tree), render(tree), full_parens(commute(tree)), render(commute(tree))):
        assert CD.verify(text, numbers=numbers, target=value) == 1.0, text
        assert CD.verify(text, numbers=numbers, target=value + 1) == 0.0, text


@FEW
@given(seed=SEEDS, difficulty=DIFFS)
def test_countdown_reference_scores_zero_for_another_target(seed, difficulty):
    item = CD.generate(seed, difficulty)
    assert CD.verify(item.answer, numbers=item.columns["numbers"], target=item.columns["target"] + 1) == 0.0


# ---------------------------------------------------------------- mixes
def test_parse_mix_expands_cells_and_weights():
    assert parse_mix("addition:1-2, multiplication:1,countdown:1|3@2.5,sorting:2-3@0.5") == [
        ("addition", 1, 1.0), ("addition", 2, 1.0), ("multiplication", 1, 1.0),
        ("countdown", 1, 2.5), ("countdown", 3, 2.5), ("sorting", 2, 0.5), ("sorting", 3, 0.5)]


@pytest.mark.parametrize("spec, fragments", [
    ("addition:4", ["'4'", "'addition:4'", "valid difficulties of addition: 1, 2, 3"]),
    ("addition:1,divison:1", ["'divison'", "valid tasks: addition, addition_steps, code_mul, countdown, multiplication, rg_chain_sum, sorting"]),
    ("addition", ["'addition'", "task:difficulties", "valid tasks:"]),
    ("addition:3-1", ["'3-1'", "1, 2, 3"]),
    ("addition:1-", ["'1-'", "1, 2, 3"]),
    ("addition:x", ["'x'", "1, 2, 3"]),
    ("sorting:1@0", ["'0'", "positive finite"]),
    ("sorting:1@nan", ["'nan'", "positive finite"]),
    ("sorting:1,sorting:1-2", ["sorting:1 appears twice"]),
    ("addition:1,,sorting:1", ["bad mix entry ''"]),
])
def test_parse_mix_errors_name_the_bad_piece(spec, fragments):
    with pytest.raises(ValueError) as err:
        parse_mix(spec)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_parsed_cell_lists_are_validated_like_strings():
    with pytest.raises(ValueError, match="valid difficulties of sorting"):
        sample_items([("sorting", 7, 1.0)], split="train", start=0, count=1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        eval_items([("nope", 1, 1.0)], per_cell=1)


MIX = "addition:1-3,multiplication:2,countdown:1|3,sorting:2@2"


def test_sample_items_is_deterministic_and_windows_agree():
    full = sample_items(MIX, split="train", start=0, count=40)
    assert sample_items(MIX, split="train", start=0, count=40) == full
    assert sample_items(MIX, split="train", start=25, count=10) == full[25:35]
    cells = {(t, d) for t, d, _ in parse_mix(MIX)}
    for j, item in enumerate(full):
        assert item.seed == SEED_RANGES["train"][0] + j
        assert (item.task, item.difficulty) in cells
        assert item == get_task(item.task).generate(item.seed, item.difficulty)


def test_sample_items_follows_the_weights():
    items = sample_items("addition:1@3,sorting:1", split="train", start=0, count=400)
    frac = sum(it.task == "addition" for it in items) / 400
    # expected 3/(3+1) = 0.75; binomial sd = sqrt(0.75*0.25/400) = 0.0217, so +-0.1 is 4.6 sd
    assert 0.65 <= frac <= 0.85


def test_sample_items_stays_inside_the_split_range():
    lo, hi = SEED_RANGES["sft"]
    # the last sft item: seed 0 + 999_999 = 999_999 < 1_000_000
    assert sample_items("addition:1", split="sft", start=hi - lo - 1, count=1)[0].seed == 999_999
    with pytest.raises(ValueError, match="leave the sft seed range"):
        sample_items("addition:1", split="sft", start=hi - lo - 1, count=2)
    with pytest.raises(ValueError, match="leave the train seed range"):
        sample_items("addition:1", split="train", start=-1, count=1)
    with pytest.raises(ValueError, match="valid splits: sft, train, eval"):
        sample_items("addition:1", split="test", start=0, count=1)


def test_train_and_eval_seeds_never_overlap():
    train = sample_items(MIX, split="train", start=0, count=50)
    last_train = sample_items(MIX, split="train", start=SEED_RANGES["train"][1] - SEED_RANGES["train"][0] - 1,
                              count=1)
    held_out = eval_items(MIX, per_cell=5)
    train_seeds = {it.seed for it in train + last_train}
    eval_seeds = {it.seed for it in held_out}
    assert not train_seeds & eval_seeds
    assert max(train_seeds) == 999_999_999 < SEED_RANGES["eval"][0] <= min(eval_seeds)
    assert max(eval_seeds) < SEED_RANGES["eval"][1]


def test_eval_seed_blocks_are_fixed_and_distinct():
    # countdown is block slot 2, difficulty 2 -> cell 2*10 + 1 = 21: 1e9 + 21*1e6 + 7
    assert eval_seed("countdown", 2, 7) == 1_021_000_007
    all_cells = ",".join(f"{n}:1-3" for n in NAMES)
    seeds = [it.seed for it in eval_items(all_cells, per_cell=3)]
    assert len(seeds) == len(set(seeds)) == 12 * 3


def test_eval_items_of_a_cell_do_not_depend_on_the_rest_of_the_mix():
    alone = eval_items("addition:2", per_cell=4)
    mixed = eval_items("sorting:1@5,addition:1-3,countdown:2", per_cell=4)
    assert [it for it in mixed if (it.task, it.difficulty) == ("addition", 2)] == alone
    assert [(it.task, it.difficulty) for it in alone] == [("addition", 2)] * 4


def test_seed_report_records_train_and_eval_seeds():
    items = sample_items("addition:1", split="train", start=10, count=3) + eval_items("sorting:2", per_cell=2)
    # train seeds 1_000_000 + 10..12; sorting is slot 3, d=2 -> cell 31: 1e9 + 31e6 + 0..1
    assert seed_report(items) == {
        "train": {"addition": {"min_seed": 1_000_010, "max_seed": 1_000_012, "count": 3,
                               "difficulties": [1]}},
        "eval": {"sorting": {"min_seed": 1_031_000_000, "max_seed": 1_031_000_001, "count": 2,
                             "difficulties": [2]}},
    }
    json.dumps(seed_report(items))
