"""reasoning-gym as a data source: any generator by name with its keyword arguments.

Narrow interface (for the data-source registry to wrap):

- ``reasoning_gym_rows(name, split=, size=, seed=, **kwargs)`` -> rows ``{"prompt", "answer",
  "metadata"}``; ``metadata`` records the generator, its kwargs, the split and the item seed;
- the ``reasoning_gym`` reward (registered in ``tilt.rewards.REWARDS``) scores a completion with
  the generator's own ``score_answer``, rebuilt from the row's ``metadata``;
- ``tilt.verifiers.tasks.ReasoningGymTask``: the same generator as a tilt ``Task``
  (``generate(seed, difficulty)`` / ``verify``), for task mixes whose seeds come from ``SEED_RANGES``.

Seeds: reasoning-gym makes item ``i`` of a dataset with seed ``s`` from ``random.Random(s + i)``.
Train rows use ``s = SEED_RANGES["train"][0] + seed`` and eval rows ``SEED_RANGES["eval"][0] + seed``;
the ranges are 10^9 apart, so for ``seed + size`` below that the train and eval items never share a
generator seed. Each row records its item seed as ``metadata["rg_item_seed"]``.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any, Optional

from tilt.config import ConfigError
from tilt.rewards import REWARDS
from tilt.tasks.base import SEED_RANGES
from tilt.verifiers.columns import column

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _rg():
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError("reasoning-gym data needs the `reasoning-gym` package: "
                          "pip install 'tilt[reasoning-gym]'") from exc
    return reasoning_gym


def generator_names() -> list[str]:
    """Every reasoning-gym generator name."""
    _rg()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def make_dataset(name: str, *, seed: int, size: int, kwargs: Optional[dict[str, Any]] = None):
    """The reasoning-gym dataset ``name``; ConfigError for an unknown name or bad kwargs."""
    names = generator_names()
    if name not in names:
        raise ConfigError(f"unknown reasoning-gym generator {name!r}; valid names: {', '.join(names)}")
    try:
        return _rg().create_dataset(name, seed=seed, size=size, **(kwargs or {}))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"reasoning-gym generator {name!r} rejected kwargs {kwargs!r}: {exc}") from None


@functools.lru_cache(maxsize=64)
def _scorer(name: str, kwargs_json: str):
    return make_dataset(name, seed=0, size=1, kwargs=json.loads(kwargs_json))


def split_seed(split: str, seed: int) -> int:
    """The dataset seed of ``split`` ("train" or "eval"); train and eval seeds are disjoint."""
    if split not in ("train", "eval"):
        raise ConfigError(f"reasoning-gym split must be 'train' or 'eval', got {split!r}")
    start, stop = SEED_RANGES[split]
    if not 0 <= seed < stop - start:
        raise ConfigError(f"reasoning-gym seed {seed} must be in [0, {stop - start})")
    return start + seed


def reasoning_gym_rows(name: str, *, split: str = "train", size: int = 256, seed: int = 0,
                       **kwargs: Any) -> list[dict[str, Any]]:
    """``size`` rows of generator ``name`` built with ``kwargs``: {"prompt", "answer", "metadata"}."""
    base = split_seed(split, seed)
    if base + size > SEED_RANGES[split][1]:
        raise ConfigError(f"reasoning-gym size {size} runs past the {split} seed range")
    ds = make_dataset(name, seed=base, size=size, kwargs=kwargs)
    rows = []
    for i in range(size):
        e = ds[i]
        meta = {**e["metadata"], "rg_generator": name, "rg_kwargs": kwargs, "rg_split": split,
                "rg_dataset_seed": base, "rg_item_seed": base + i}
        rows.append({"prompt": e["question"], "answer": e["answer"], "metadata": meta})
    return rows


def extract_answer(completion: str) -> str:
    """The last <answer>...</answer> of ``completion``, else the whole completion, stripped."""
    found = _ANSWER.findall(completion)
    return (found[-1] if found else completion).strip()


def score_entry(completion: str, answer: str, metadata: dict[str, Any]) -> float:
    """The generator's own ``score_answer`` on the completion's answer, in [0, 1]."""
    name = metadata.get("rg_generator") or metadata.get("source_dataset")
    if name is None:
        raise ValueError("reasoning_gym: the row's metadata names no generator (rg_generator / source_dataset)")
    ds = _scorer(name, json.dumps(metadata.get("rg_kwargs") or {}, sort_keys=True))
    return float(ds.score_answer(extract_answer(completion), {"answer": answer, "metadata": metadata}) or 0.0)


@REWARDS.register("reasoning_gym", needs_columns=("answer", "metadata"))
def reasoning_gym_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """Each completion scored by its row's reasoning-gym generator (``score_answer``)."""
    n = len(completions)
    answers = column("answer", n, kwargs, required=True, who="reasoning_gym")
    metas = column("metadata", n, kwargs, required=True, who="reasoning_gym")
    return [score_entry(c, a, m) for c, a, m in zip(completions, answers, metas)]


__all__ = ["extract_answer", "generator_names", "make_dataset", "reasoning_gym_reward", "reasoning_gym_rows",
           "reasoning_gym_source", "rg_items", "score_entry", "split_seed"]


def rg_items(rows: list[dict[str, Any]], *, tokenizer, chat: bool) -> list:
    """tilt Items of reasoning-gym rows: the question as prompt (a one-message chat when ``chat``, rendered
    with the tokenizer's template), ``answer`` and ``metadata`` as reward columns."""
    from tilt.data.prompts import render
    from tilt.tasks.base import Item

    out = []
    for row in rows:
        raw = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
        seed = row["metadata"]["rg_item_seed"]
        out.append(Item(task=f"rg:{row['metadata']['rg_generator']}", difficulty=0, seed=seed,
                        prompt=render(tokenizer, raw), answer=str(row["answer"]), raw_prompt=None if not chat else raw,
                        fields={"answer": row["answer"], "metadata": row["metadata"]}))
    return out


def reasoning_gym_source(cfg, tokenizer, train_dataset=None, eval_dataset=None):
    """A reasoning-gym generator as the run's data (``data.source=reasoning_gym``), set by ``data.kwargs``:
    ``generator`` (a name from ``generator_names()``), ``size`` (train rows, default 1000), ``eval_size``
    (held-out rows, default 64), ``chat`` (wrap each question as a user message for an instruct model's
    chat template, default false), and the generator's own keyword arguments. Seed ``s`` trains on the
    item seeds [train start + s*size, + size); every seed evaluates on the same eval items; the two
    ranges are disjoint (``split_seed``) and both are recorded in seeds.json."""
    from tilt.data.sources import RowSource, _unk_warning

    if train_dataset is not None or eval_dataset is not None:
        raise ConfigError("data.source 'reasoning_gym' generates its rows; pass no dataset")
    kw = dict(cfg.data.kwargs)
    name = kw.pop("generator", None)
    if not isinstance(name, str):
        raise ConfigError(f"data.source 'reasoning_gym' needs data.kwargs.generator, one of: "
                          f"{', '.join(generator_names())}")
    size, eval_size, chat = kw.pop("size", 1000), kw.pop("eval_size", 64), kw.pop("chat", False)
    for key, v in (("size", size), ("eval_size", eval_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"data.kwargs.{key} must be a positive integer, got {v!r}")
    if not isinstance(chat, bool):
        raise ConfigError(f"data.kwargs.chat must be true or false, got {chat!r}")
    train = rg_items(reasoning_gym_rows(name, split="train", size=size, seed=cfg.seed * size, **kw),
                     tokenizer=tokenizer, chat=chat)
    heldout = rg_items(reasoning_gym_rows(name, split="eval", size=eval_size, seed=0, **kw),
                       tokenizer=tokenizer, chat=chat)
    info = {"train": f"reasoning_gym:{name} {kw or ''} item seeds [{train[0].seed}, {train[-1].seed + 1})".replace("  ", " "),
            "eval": f"reasoning_gym:{name} item seeds [{heldout[0].seed}, {heldout[-1].seed + 1})",
            "train_rows": len(train), "eval_rows": len(heldout), "eval_overlap_train": 0,
            "allow_contaminated": cfg.data.allow_contaminated, "contaminated": False}
    return RowSource(train, heldout, info, _unk_warning(tokenizer, [it.prompt for it in train + heldout]))

