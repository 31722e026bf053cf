"""A tiny registry: names -> callables, so configs hold strings, never classes."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. ``@REG.register("name")`` adds one; ``REG.get(name)`` looks it up
    and raises a ``ValueError`` listing the valid names when the name is unknown."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named (tests register temporary entries)."""
        self.get(name)  # raises naming the valid names
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid choices: {sorted(self._items)}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


# The two registries of the attention core live here, below everything that fills them, so that
# ``moh.config`` can validate names without importing the routers or backends (no import cycle).
# ``moh.core.routers`` and ``moh.backends`` register into them; ``import moh`` imports both.
ROUTERS: Registry = Registry("router")  # name -> router class, built as cls(MoHConfig)
BACKENDS: Registry = Registry("backend")  # name -> callable(AttentionCall) -> Tensor (B, T, D)
