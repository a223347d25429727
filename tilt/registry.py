"""One registry per axis of variation: a name -> callable map chosen by a config string.

An unknown name is an error that lists the valid ones (STYLE.md rule 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(KeyError):
    """Raised when a registry is asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass
class Entry(Generic[F]):
    """A registered callable plus its declared metadata (e.g. default reduction)."""

    name: str
    fn: F
    meta: dict[str, Any] = field(default_factory=dict)

    def needs(self, kwargs: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The named inputs this entry reads: meta ``needs``, a tuple or a function of the
        method's configured keyword arguments (e.g. an input read only for one setting)."""
        n = self.meta.get("needs", ())
        return tuple(n(kwargs or {}) if callable(n) else n)


class Registry(Generic[F]):
    """A named map of callables. ``@REG.register("name", key=value)`` adds one."""

    def __init__(self, axis: str):
        self.axis = axis
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.axis} registry already has an entry named {name!r}")
            self._entries[name] = Entry(name, fn, dict(meta))
            return fn

        return deco

    def entry(self, name: str) -> Entry[F]:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise UnknownNameError(f"unknown {self.axis} {name!r}; valid names: {valid}") from None

    def get(self, name: str) -> F:
        return self.entry(name).fn

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
