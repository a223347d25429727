"""Data sources: where a run's train prompts and held-out prompts come from.

A source hands out ``Item``s: ``train_items(start, count)`` (item j of an endless, seeded
stream) and ``eval_items()`` (the fixed held-out set), and describes itself for seeds.json
with ``report(start, count)``. Two kinds exist:

* ``TaskSource``: the built-in procedural tasks of ``tasks.mix`` (seed ranges of tilt.tasks.mix);
* ``RowSource``: rows of a dataset (a local file through ``datasets``, or a ``datasets.Dataset``
  given to the Python API). Train item j is row ``perm_e[j mod N]``, ``perm_e`` the shuffle of
  epoch ``e = j // N`` seeded by ``"data:{e}"``; the held-out rows are an eval file, or the rows
  whose normalised-prompt hash falls in ``data.eval.fraction`` (tilt.data.prompts.in_heldout).

Train and eval prompts are compared by normalised-prompt hash; an overlap is refused unless
``data.allow_contaminated`` is set, and is recorded in seeds.json either way.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Protocol

from tilt.config import Config, ConfigError
from tilt.data.files import check_rows, load_file
from tilt.data.prompts import in_heldout, prompt_hash, render, unknown_chars
from tilt.registry import Registry
from tilt.tasks.base import Item
from tilt.tasks.mix import eval_items, parse_mix, sample_items, seed_report

# columns TRL never passes to reward functions (GRPOTrainer._calculate_rewards, TRL 1.16)
NOT_REWARD_COLUMNS = ("completion", "completion_ids")

# kind of source -> builder(cfg, tokenizer, train_dataset, eval_dataset) -> Source (data.source)
SOURCES: Registry = Registry("data source")


class Source(Protocol):
    conversational: bool
    warnings: list[str]

    def train_items(self, start: int, count: int) -> list[Item]: ...

    def eval_items(self) -> list[Item]: ...

    def report(self, start: int, count: int) -> dict: ...


class TaskSource:
    """The built-in procedural tasks: train item j has generator seed SEED_RANGES["train"][0] + j."""

    conversational = False

    def __init__(self, mix: str, *, eval_per_cell: int = 64):
        self.cells, self.eval_per_cell, self.warnings = parse_mix(mix), eval_per_cell, []

    def train_items(self, start: int, count: int) -> list[Item]:
        return sample_items(self.cells, split="train", start=start, count=count)

    def eval_items(self) -> list[Item]:
        return eval_items(self.cells, per_cell=self.eval_per_cell)

    def report(self, start: int, count: int) -> dict:
        """{"train": {task: seed range}, "eval": {...}} as tilt.tasks.mix.seed_report writes it."""
        return {**seed_report(self.train_items(start, count)), **seed_report(self.eval_items())}


class RowSource:
    """Rows of a dataset, shuffled per epoch; held-out rows fixed."""

    def __init__(self, train: list[Item], heldout: list[Item], info: dict[str, Any], warnings: list[str]):
        if not train:
            raise ConfigError("the train source has no rows left after holding out the eval fraction; "
                              "lower data.eval.fraction or give data.eval.path")
        self.train, self.heldout, self.info, self.warnings = train, heldout, info, warnings
        self.conversational = train[0].raw_prompt is not None and not isinstance(train[0].raw_prompt, str)
        self._perms: dict[int, list[int]] = {}

    def _row(self, j: int) -> Item:
        n = len(self.train)
        epoch = j // n
        if epoch not in self._perms:
            perm = list(range(n))
            random.Random(f"data:{epoch}").shuffle(perm)
            self._perms = {epoch: perm}  # one epoch cached: the stream reads forward
        return self.train[self._perms[epoch][j % n]]

    def train_items(self, start: int, count: int) -> list[Item]:
        return [self._row(j) for j in range(start, start + count)]

    def eval_items(self) -> list[Item]:
        return list(self.heldout)

    def report(self, start: int, count: int) -> dict:
        """{"dataset": {train / eval source, rows, rows drawn, overlap}} for seeds.json."""
        used = {it.seed for it in self.train_items(start, count)}
        return {"dataset": {**self.info, "train_rows_drawn": len(used), "train_draws": count}}


def _items(rows: list[dict], *, prompt_column: str, tokenizer, label: str, breakdown: Optional[str]) -> list[Item]:
    """One Item per row: ``prompt`` rendered, ``raw_prompt`` as stored, ``fields`` the reward columns."""
    out = []
    for i, row in enumerate(rows):
        raw = row[prompt_column]
        fields = {k: v for k, v in row.items() if k != prompt_column and k not in NOT_REWARD_COLUMNS}
        task = f"{breakdown}={row[breakdown]}" if breakdown else label
        out.append(Item(task=task, difficulty=0, seed=i, prompt=render(tokenizer, raw), answer="",
                        raw_prompt=None if isinstance(raw, str) else raw, fields=fields))
    return out


def _load(cfg_src, dataset, *, field: str, prompt_column: str) -> tuple[list[dict], str]:
    if dataset is not None:
        return check_rows(dataset, prompt_column=prompt_column, where=f"{field} (dataset object)"), "<in-memory Dataset>"
    ds = load_file(cfg_src.path, split=cfg_src.split, fmt=cfg_src.format, field=f"{field}.path")
    return check_rows(ds, prompt_column=prompt_column, where=f"{field} {cfg_src.path!r}"), str(cfg_src.path)


def source_kind(cfg: Config, *, given: bool = False) -> str:
    """``data.source``, with "auto" = "dataset" when data.train.path is set (or a Dataset is
    ``given`` to the Python API), else "tasks"."""
    if cfg.data.source != "auto":
        return cfg.data.source
    return "dataset" if given or cfg.data.train.path is not None else "tasks"


def build_source(cfg: Config, tokenizer, *, train_dataset=None, eval_dataset=None) -> Source:
    """The run's source, built by the ``SOURCES`` entry ``source_kind`` names.

    Raises ConfigError for unreadable / invalid datasets and for train/eval overlap (unless
    ``data.allow_contaminated``)."""
    kind = source_kind(cfg, given=train_dataset is not None)
    return SOURCES.get(kind)(cfg, tokenizer, train_dataset, eval_dataset)


@SOURCES.register("tasks")
def task_source(cfg: Config, tokenizer, train_dataset=None, eval_dataset=None) -> TaskSource:
    """The built-in procedural tasks of ``tasks.mix`` (held out: ``tasks.eval_per_cell`` per cell)."""
    if train_dataset is not None or eval_dataset is not None or cfg.data.eval.path is not None:
        raise ConfigError("data.source 'tasks' takes no dataset; data.eval.path (or eval_dataset) needs a train "
                          "dataset too (data.train.path)")
    return TaskSource(cfg.tasks.mix, eval_per_cell=cfg.tasks.eval_per_cell)


@SOURCES.register("dataset")
def dataset_source(cfg: Config, tokenizer, train_dataset=None, eval_dataset=None) -> RowSource:
    """Rows of ``data.train.path`` (or ``train_dataset``); held out: ``data.eval``."""
    d = cfg.data
    if train_dataset is None and d.train.path is None:
        raise ConfigError("data.source 'dataset' needs data.train.path (or train_dataset in the Python API)")
    col = d.prompt_column
    train_rows, train_name = _load(d.train, train_dataset, field="data.train", prompt_column=col)
    if eval_dataset is not None or d.eval.path is not None:
        eval_rows, eval_name = _load(d.eval, eval_dataset, field="data.eval", prompt_column=col)
    else:
        held = [in_heldout(r[col], d.eval.fraction) for r in train_rows]
        eval_rows = [r for r, h in zip(train_rows, held) if h]
        train_rows = [r for r, h in zip(train_rows, held) if not h]
        eval_name = f"{train_name} (held-out fraction {d.eval.fraction} by prompt hash)"
        if not eval_rows:
            raise ConfigError(f"data.eval.fraction={d.eval.fraction} holds out none of the {len(held)} train rows; "
                              "raise it or give data.eval.path")
    if d.eval.max_rows is not None:
        eval_rows = eval_rows[:d.eval.max_rows]
    if d.eval.breakdown is not None and d.eval.breakdown not in eval_rows[0]:
        raise ConfigError(f"data.eval.breakdown: no column {d.eval.breakdown!r} in the eval rows; "
                          f"columns: {', '.join(eval_rows[0])}")
    train_hashes = {prompt_hash(r[col]) for r in train_rows}
    overlap = sum(prompt_hash(r[col]) in train_hashes for r in eval_rows)
    if overlap and not d.allow_contaminated:
        raise ConfigError(f"{overlap} of {len(eval_rows)} eval prompts also appear in the train source "
                          f"(same prompt after lower-casing and collapsing whitespace), so their scores would "
                          "measure memorisation; remove them, or set data.allow_contaminated=true (tilt train "
                          "--allow-contaminated) to evaluate anyway; the run is then marked contaminated")
    kinds = {isinstance(train_rows[0][col], str), isinstance(eval_rows[0][col], str)}
    if len(kinds) > 1:
        raise ConfigError("train and eval sources mix prompt types (one has strings, the other messages)")
    train = _items(train_rows, prompt_column=col, tokenizer=tokenizer, label="data", breakdown=None)
    heldout = _items(eval_rows, prompt_column=col, tokenizer=tokenizer, label="data", breakdown=d.eval.breakdown)
    info = {"train": train_name, "eval": eval_name, "train_rows": len(train), "eval_rows": len(heldout),
            "eval_overlap_train": overlap, "allow_contaminated": d.allow_contaminated,
            "contaminated": bool(overlap)}
    return RowSource(train, heldout, info, _unk_warning(tokenizer, [it.prompt for it in train + heldout]))


@SOURCES.register("reasoning_gym")
def reasoning_gym(cfg: Config, tokenizer, train_dataset=None, eval_dataset=None) -> RowSource:
    """A reasoning-gym generator's rows (``data.kwargs``: generator, size, eval_size, chat, and the
    generator's own keywords), scored by the ``reasoning_gym`` reward; see
    ``tilt.verifiers.reasoning_gym_source.reasoning_gym_source``."""
    from tilt.verifiers.reasoning_gym_source import reasoning_gym_source

    return reasoning_gym_source(cfg, tokenizer, train_dataset, eval_dataset)


def eval_only_source(cfg: Config, tokenizer, path: str) -> RowSource:
    """Every row of the dataset at ``path`` as held-out items, for ``tilt eval MODEL --data FILE``
    when no run (hence no train source) is known: nothing to compare against, overlap 0."""
    d = cfg.data
    ds = load_file(path, split=d.eval.split, fmt=d.eval.format, field="--data")
    rows = check_rows(ds, prompt_column=d.prompt_column, where=f"--data {path!r}")[:d.eval.max_rows or None]
    if d.eval.breakdown is not None and d.eval.breakdown not in rows[0]:
        raise ConfigError(f"--breakdown: no column {d.eval.breakdown!r} in {path!r}; columns: {', '.join(rows[0])}")
    items = _items(rows, prompt_column=d.prompt_column, tokenizer=tokenizer, label="data", breakdown=d.eval.breakdown)
    info = {"train": None, "eval": str(path), "train_rows": 0, "eval_rows": len(items), "eval_overlap_train": 0,
            "allow_contaminated": d.allow_contaminated, "contaminated": False}
    return RowSource(items, items, info, _unk_warning(tokenizer, [it.prompt for it in items]))


def _unk_warning(tokenizer, texts: list[str]) -> list[str]:
    bad, chars = unknown_chars(tokenizer, texts)
    if not bad:
        return []
    return [f"warning: {bad} prompts contain characters the tokenizer maps to {tokenizer.unk_token!r} "
            f"({chars!r}); the model cannot read them. Use a model whose tokenizer covers them, or "
            "rewrite those prompts"]
