"""Name -> class registries, resolved once when a model is built."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry:
    """A small exact-name table of component classes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type:
        _load_components()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None

    def names(self) -> list[str]:
        _load_components()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_components()
        return name in self._items


def _load_components() -> None:
    # Components register on import; make lookups work whatever the caller imported first.
    import llm.core  # noqa: F401


ATTENTION_REGISTRY = Registry("attention")
MLP_REGISTRY = Registry("mlp")
NORM_REGISTRY = Registry("norm")
