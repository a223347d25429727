"""The ``tilt compare`` spec: which methods, seeds and tasks to run, and how to score them.

A spec YAML expands into a grid of runs (method x task x seed), each one ``tilt train`` with
the method's config overrides plus ``seed`` and ``tasks.mix``. Every field is documented
below; an unknown key or bad value is a ``SpecError`` naming the field and the value.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # safe as part of a directory name
GRID_KEYS = ("seed", "tasks.mix")  # set by the grid itself, never by a method
DATASET = "dataset"  # a tasks entry meaning "the base config's data.* source" (no tasks.mix override)


class SpecError(ValueError):
    """A compare spec that cannot be used; the message names field, value and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class MethodSpec(_Strict):
    overrides: dict[str, Any] = {}
    """Config overrides of this method, as for ``tilt train --set``: {"loss.name": "grpo", "kl.beta": 0.0}."""

    @field_validator("overrides")
    @classmethod
    def _keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in GRID_KEYS:
                raise ValueError(f"override {key!r} is set per run by the grid (seeds / tasks); remove it here")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ValueError(f"override key {key!r} must be a dotted config path like 'loss.name'")
        return v


class CompareSpec(_Strict):
    name: str
    """Name of the comparison, shown in the report title."""
    base_config: Optional[Path] = None
    """Training config every run starts from (a relative path is relative to the spec file); None = defaults."""
    methods: dict[str, MethodSpec]
    """Method name -> its overrides. Names become run-directory names: letters, digits, _ . + - only."""
    seeds: list[int]
    """Training seeds; every (method, task) pair runs once per seed. The runs are the rows of the score matrix."""
    tasks: list[str]
    """Task mixes, e.g. "addition:1-2"; each one is trained and evaluated separately and is one column of the score
    matrix. "dataset" = the base config's own data source (data.train.path), scored with its reward functions."""
    baseline: str
    """The method every other method is compared against (probability of improvement)."""
    workers: Optional[int] = Field(None, ge=1)
    """Runs trained at the same time; None = os.cpu_count()."""
    metric: Literal["greedy", "pass1"] = "greedy"
    """Held-out score of a run: "greedy" accuracy or "pass1" (mean of n samples at T=1) after training."""
    steps: Optional[int] = Field(None, ge=1)
    """Override train.steps for every run (None = what the base config says)."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: dict[str, MethodSpec]) -> dict[str, MethodSpec]:
        if not v:
            raise ValueError("needs at least one method")
        for name in v:
            if not NAME_RE.match(name) or "__" in name:
                raise ValueError(f"method name {name!r} must use letters, digits, _ . + - only (and no '__')")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one seed")
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {v}")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one task")
        from tilt.tasks.mix import parse_mix

        for task in v:
            if task != DATASET:
                parse_mix(task)  # ValueError names the bad piece and the valid tasks / difficulties
        slugs = [task_slug(t) for t in v]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"tasks {v} are not distinct (directory names {slugs})")
        return v

    @model_validator(mode="after")
    def _baseline(self) -> "CompareSpec":
        if self.baseline not in self.methods:
            raise ValueError(f"baseline {self.baseline!r} is not one of the methods: {', '.join(self.methods)}")
        return self


def task_slug(task: str) -> str:
    """A directory-safe name for a task mix: "addition:1-2,sorting:1@2" -> "addition-1-2_sorting-1w2"."""
    slug = task.replace(" ", "").replace(",", "_").replace(":", "-").replace("|", "+").replace("@", "w")
    return re.sub(r"[^A-Za-z0-9_.+-]", "", slug)


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"invalid compare spec ({source}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(spec)"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(CompareSpec.model_fields if len(err["loc"]) == 1 else MethodSpec.model_fields)
            lines.append(f"  unknown field {field!r} (value {value!r}); allowed fields here: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  field {field!r}: value {value!r} is not allowed: {msg}")
    return "\n".join(lines)


def parse_spec(raw: Any, *, source: str = "spec", root: Path | None = None) -> CompareSpec:
    """Validate a parsed spec mapping; a relative ``base_config`` is resolved against ``root``."""
    if not isinstance(raw, dict):
        raise SpecError(f"compare spec ({source}) must be a mapping, got {type(raw).__name__}")
    try:
        spec = CompareSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format(exc, source)) from None
    if spec.base_config is not None:
        path = spec.base_config if spec.base_config.is_absolute() or root is None else root / spec.base_config
        if not path.is_file():
            raise SpecError(f"invalid compare spec ({source}):\n  field 'base_config': value "
                            f"{str(spec.base_config)!r} is not allowed: no such file {str(path)!r}")
        spec = spec.model_copy(update={"base_config": path.resolve()})
    if DATASET in spec.tasks:
        from tilt.config import ConfigError, load_config

        try:
            has_data = load_config(spec.base_config).data.train.path is not None
        except ConfigError as exc:
            raise SpecError(f"invalid compare spec ({source}): base_config: {exc}") from None
        if not has_data:
            raise SpecError(f"invalid compare spec ({source}):\n  field 'tasks': value {DATASET!r} needs a "
                            "base_config with data.train.path set")
    return spec


def load_spec(path: str | Path) -> CompareSpec:
    """Read and validate a compare spec YAML file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"compare spec {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"compare spec {str(p)!r} is not valid YAML: {exc}") from exc
    return parse_spec(raw, source=str(p), root=p.parent)
