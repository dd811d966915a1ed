"""Name-based registries, so a user adds a sampler, potential, selector, labeller or
trainer by decorating a class, without touching the engine.

Each registered class has a nested pydantic ``Params`` model (``extra="forbid"``) and a
constructor taking one ``Params`` instance. ``Registry.build(name, params, where=...)``
validates the YAML mapping against ``Params`` and names the config field at fault.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown implementation name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def decorate(cls: type) -> type:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._items[name]}"
                )
            if not hasattr(cls, "Params"):
                raise TypeError(f"{self.kind} {cls.__name__} needs a nested pydantic Params model")
            cls.name = name
            self._items[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> type:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def validate_params(self, name: str, params: Mapping[str, Any] | None) -> BaseModel:
        """Validate a params mapping; raises pydantic ValidationError on bad input."""
        return self.get(name).Params.model_validate(dict(params or {}))

    def build(self, name: str, params: Mapping[str, Any] | BaseModel | None = None) -> T:
        cls = self.get(name)
        if not isinstance(params, BaseModel):
            params = cls.Params.model_validate(dict(params or {}))
        return cls(params)


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a package, so that a new implementation file registers itself
    by being there (call at the bottom of the package's ``__init__``)."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per error: ``field.path: reason``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        lines.append(f"{field}: {err['msg']}")
    return "\n".join(lines)
