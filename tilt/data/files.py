"""Local datasets in, validated rows out: JSONL / JSON, CSV, Parquet and ``save_to_disk`` folders.

Every format is one entry of ``FORMATS`` (a loader ``path, split -> datasets.Dataset``), read
through the ``datasets`` library. ``check_rows`` refuses what would otherwise fail mid-run:
an empty dataset, a missing prompt column, a null prompt, mixed string / conversational prompts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tilt.config import ConfigError
from tilt.data.prompts import prompt_kind
from tilt.registry import Registry

FORMATS: Registry = Registry("data format")


def _builder(name: str, path: Path, split: Optional[str]):
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    return load_dataset(name, data_files=str(path), split=split or "train")


@FORMATS.register("json", suffixes=(".json", ".jsonl"))
def load_json(path: Path, split: Optional[str]):
    """JSON lines (one object per line) or a JSON array / {"data": [...]} file."""
    return _builder("json", path, split)


@FORMATS.register("csv", suffixes=(".csv",))
def load_csv(path: Path, split: Optional[str]):
    """Comma-separated values with a header row (pandas parses the column types)."""
    return _builder("csv", path, split)


@FORMATS.register("parquet", suffixes=(".parquet",))
def load_parquet(path: Path, split: Optional[str]):
    """An Apache Parquet file."""
    return _builder("parquet", path, split)


@FORMATS.register("disk", suffixes=())
def load_disk(path: Path, split: Optional[str]):
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split``
    picks one of a DatasetDict's splits, default "train")."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        name = split or "train"
        if name not in ds:
            raise ConfigError(f"dataset {str(path)!r} has splits {', '.join(ds)}; no split {name!r} "
                              "(set data.train.split / data.eval.split)")
        return ds[name]
    return ds


def detect_format(path: Path) -> str:
    """The FORMATS name for ``path``: a folder is "disk", a file goes by its suffix."""
    if path.is_dir():
        return "disk"
    for name in FORMATS.names():
        if path.suffix.lower() in FORMATS.entry(name).meta["suffixes"]:
            return name
    known = sorted(s for n in FORMATS.names() for s in FORMATS.entry(n).meta["suffixes"])
    raise ConfigError(f"cannot tell the format of {str(path)!r} from its suffix {path.suffix!r}; known suffixes: "
                      f"{', '.join(known)} or a save_to_disk folder (or set data.train.format)")


def load_file(path: str, *, split: Optional[str] = None, fmt: str = "auto", field: str = "data.train.path"):
    """Load a local dataset with the ``datasets`` library; ConfigError naming ``field`` when it
    does not exist or cannot be read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{field}: dataset file {str(p)!r} does not exist")
    name = detect_format(p) if fmt == "auto" else fmt
    if p.is_file() and p.stat().st_size < 65536 and not p.read_bytes().strip():
        raise ConfigError(f"{field}: the dataset {str(p)!r} is empty (0 rows)")
    loader = FORMATS.get(name)
    try:
        return loader(p, split)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; name the file and the cause
        raise ConfigError(f"{field}: could not read {str(p)!r} as {name}: {type(exc).__name__}: {exc}") from exc


def check_rows(ds, *, prompt_column: str, where: str) -> list[dict[str, Any]]:
    """The rows of ``ds`` as dicts, after checking they can be trained on.

    Raises ConfigError for: no rows, no ``prompt_column``, a null / empty prompt, a prompt that is
    neither a string nor a list of {role, content} messages, or rows mixing the two kinds.
    """
    columns = list(getattr(ds, "column_names", None) or (ds[0].keys() if len(ds) else []))
    if len(ds) == 0:
        raise ConfigError(f"{where}: the dataset is empty (0 rows)")
    if prompt_column not in columns:
        raise ConfigError(f"{where}: no prompt column {prompt_column!r}; the columns are {', '.join(columns)} "
                          "(set data.prompt_column)")
    rows = [dict(r) for r in ds]
    kinds: dict[str, int] = {}
    for i, row in enumerate(rows):
        p = row[prompt_column]
        if p is None or (isinstance(p, (str, list)) and not p):
            raise ConfigError(f"{where}: row {i} has an empty or null {prompt_column!r}")
        kind = prompt_kind(p)
        if kind == "other":
            raise ConfigError(f"{where}: row {i}: {prompt_column!r} must be a string or a list of "
                              f"{{'role', 'content'}} messages, got {type(p).__name__} {str(p)[:60]!r}")
        kinds.setdefault(kind, i)
    if len(kinds) > 1:
        raise ConfigError(f"{where}: rows mix prompt types: row {kinds['string']} is a string and row "
                          f"{kinds['messages']} is a list of messages; use one type for the whole dataset")
    return rows
