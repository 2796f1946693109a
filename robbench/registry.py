"""Name -> object registries that reject duplicates and explain unknown names."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the available names."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        super().__init__(f"unknown {kind} {name!r}; available: {', '.join(available) or '(none)'}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr with quotes
        return self.args[0]


class Registry(Generic[T]):
    """Objects of one kind (models, attacks, ...) keyed by name, with the distribution they came from."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._sources: dict[str, str] = {}

    def add(self, name: str, obj: T, source: str) -> None:
        if name in self._items:
            raise ValueError(
                f"{self.kind} {name!r} registered twice: by {self._sources[name]} and by {source}"
            )
        self._items[name] = obj
        self._sources[name] = source

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(self.kind, name, self.names())
        return self._items[name]

    def source(self, name: str) -> str:
        return self._sources[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
