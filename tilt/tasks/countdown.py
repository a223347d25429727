"""Countdown: "cd 3 5 7>22:" -> "3*5+7" (catalogue G3).

Reach the target with + - * and parentheses, each given number used at most once. The
verifier parses the completion with a tiny recursive-descent parser (never ``eval``):

    expr   := term (("+" | "-") term)*      # left-associative
    term   := factor ("*" factor)*
    factor := NUMBER | "(" expr ")"         # no unary minus, no division
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Union

from tilt.tasks.arithmetic import check_item_args, seeded_rng
from tilt.tasks.base import Item

# An expression tree: a leaf number, or (op, left, right) with op in "+-*".
Tree = Union[int, tuple[str, "Tree", "Tree"]]

OPS = "+-*"
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
DIGITS = frozenset("0123456789")
MAX_CHARS = 40
MAX_TARGET = 999
MAX_ATTEMPTS = 10_000


def evaluate(tree: Tree) -> int:
    """The integer value of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    return a + b if op == "+" else a - b if op == "-" else a * b


def render(tree: Tree) -> str:
    """Print ``tree`` with the fewest parentheses that keep its value under standard
    precedence (* over + -, left-associative). A right child of equal precedence is wrapped
    only under "-" (a-(b+c) != a-b+c), since a+(b-c) = a+b-c and a*(b*c) = a*b*c."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int):
        right_prec = PRECEDENCE[right[0]]
        if right_prec < PRECEDENCE[op] or (right_prec == PRECEDENCE[op] and op == "-"):
            right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def random_tree(rng: Any, leaves: list[int]) -> Tree:
    """A random binary tree over ``leaves`` in order: uniform split point, uniform operator."""
    if len(leaves) == 1:
        return leaves[0]
    k = rng.randint(1, len(leaves) - 1)
    return (rng.choice(OPS), random_tree(rng, leaves[:k]), random_tree(rng, leaves[k:]))


class _Reject(Exception):
    """The completion is not a valid expression."""


def _tokenize(text: str) -> list[str]:
    """Split into numbers and the single characters + - * ( ); spaces separate tokens."""
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c == " ":
            i += 1
        elif c in "+-*()":
            tokens.append(c)
            i += 1
        elif c in DIGITS:
            j = i
            while j < len(text) and text[j] in DIGITS:
                j += 1
            if text[i] == "0" and j - i > 1:
                raise _Reject("leading zero")
            tokens.append(text[i:j])
            i = j
        else:
            raise _Reject(f"character {c!r}")
    return tokens


class _Parser:
    """Recursive descent over tokens; records every number it reads in ``used``."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.used = tokens, 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> int:
        value = self.term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> int:
        value = self.factor()
        while self._peek() == "*":
            self.pos += 1
            value *= self.factor()
        return value

    def factor(self) -> int:
        tok = self._peek()
        if tok is None:
            raise _Reject("unexpected end")
        self.pos += 1
        if tok == "(":
            value = self.expr()
            if self._peek() != ")":
                raise _Reject("missing )")
            self.pos += 1
            return value
        if tok[0] in DIGITS:
            self.used.append(int(tok))
            return int(tok)
        raise _Reject(f"unexpected {tok!r}")  # unary minus, "**", ")" ...


def parse_expression(text: str) -> tuple[int, list[int]] | None:
    """(value, numbers used) of an expression over + - * ( ) and non-negative integers, or
    None if ``text`` is not one (any other character, unary minus, leading zeros, junk)."""
    try:
        parser = _Parser(_tokenize(text))
        value = parser.expr()
        if parser.pos != len(parser.tokens):
            raise _Reject("trailing tokens")
    except _Reject:
        return None
    return value, parser.used


@dataclass(frozen=True)
class CountdownTask:
    """d+1 numbers (1..12 for up to 3 numbers, 1..9 for 4); the target is the value of a
    random expression over all of them. Any valid expression reaching the target scores 1."""

    name: str = "countdown"
    difficulties: tuple[int, ...] = (1, 2, 3)

    def generate(self, seed: int, difficulty: int) -> Item:
        """The item for (seed, difficulty); deterministic. Redraws numbers and expression from
        the same generator until 0 <= target <= 999 and target is not a given number."""
        seed, difficulty = check_item_args(self, seed, difficulty)
        rng = seeded_rng(self.name, difficulty, seed)
        n = difficulty + 1
        high = 12 if n <= 3 else 9
        for _ in range(MAX_ATTEMPTS):
            numbers = [rng.randint(1, high) for _ in range(n)]
            tree = random_tree(rng, rng.sample(numbers, n))  # all numbers, random order
            target = evaluate(tree)
            if 0 <= target <= MAX_TARGET and target not in numbers:
                break
        else:  # pragma: no cover - a + b always qualifies, so this needs ~impossible luck
            raise RuntimeError(f"countdown: no valid target after {MAX_ATTEMPTS} draws")
        numbers.sort()
        prompt = "cd " + " ".join(map(str, numbers)) + f">{target}:"
        return Item(self.name, difficulty, seed, prompt, render(tree),
                    {"numbers": numbers, "target": target})

    def verify(self, completion: str, *, numbers: list[int], target: int) -> float:
        """1.0 iff the stripped completion (at most 40 characters) is an expression over
        + - * ( ) using each given number at most as often as given, with value ``target``."""
        if not isinstance(completion, str) or len(completion.strip()) > MAX_CHARS:
            return 0.0
        parsed = parse_expression(completion.strip())
        if parsed is None:
            return 0.0
        value, used = parsed
        if Counter(used) - Counter(numbers):  # some number used more often than given
            return 0.0
        return float(value == target)


COUNTDOWN = CountdownTask()
