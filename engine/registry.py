"""A tiny name -> factory registry (timm style): decorators bare or named, a warning on overwrite."""
from __future__ import annotations

import warnings
from typing import Callable, TypeVar

T = TypeVar("T", bound=Callable)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str | T | None = None) -> Callable[[T], T] | T:
        def deco(fn: T, key: str | None = None) -> T:
            key = key or fn.__name__
            if key in self._items:
                warnings.warn(f"{self.kind} '{key}' registered twice; the later one wins", stacklevel=3)
            self._items[key] = fn
            return fn

        if callable(name):
            return deco(name)
        return lambda fn: deco(fn, name)

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
