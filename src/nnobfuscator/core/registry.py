"""A small name -> object registry that refuses a name registered twice."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name (strategies, tasks, ...); a duplicate name is an error, never an overwrite.

    Args:
        kind: what the registry holds, for error messages (``"strategy"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``.

        Raises:
            ValueError: ``name`` is already registered (unregister it first to replace it).
        """
        if name in self._items:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered "
                f"({self._items[name]!r}); pick another name or unregister the old one first"
            )
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class TypeRegistry(Generic[T]):
    """Objects by module type, looked up along a class's MRO (the most specific base wins).

    Args:
        kind: what the registry holds, for error messages (``"block adapter"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[type, T] = {}

    def register(self, cls: type, item: T) -> T:
        """Add ``item`` for ``cls`` and its subclasses.

        Raises:
            ValueError: ``cls`` already has one.
        """
        if cls in self._items:
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} already has a {self.kind}; unregister it "
                "first to replace it"
            )
        self._items[cls] = item
        return item

    def unregister(self, cls: type) -> None:
        self._items.pop(cls, None)

    def lookup(self, obj: object) -> T | None:
        for cls in type(obj).__mro__:
            if cls in self._items:
                return self._items[cls]
        return None
