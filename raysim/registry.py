"""Name registries: how a YAML file names an implementation, and how validation knows every name.

A registry maps names to implementations (classes, factories); an
implementation registers itself where it is defined, with
``@REGISTRY.register("name")``. Config validation reads the registry, so a
new rule is one class and no list of allowed values needs to follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Implementations by name, in registration order."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = item
            return item

        return add

    def choices(self) -> str:
        """The names for a message: ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
        quoted = [f"'{name}'" for name in self]
        return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
