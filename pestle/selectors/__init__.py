"""Selectors: choose which scored candidates deserve a reference label.

Protocol: a registered class with a nested pydantic ``Params`` model and
``select(candidates, budget) -> list[Selection]``. Deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from pestle.registry import Registry, import_submodules


@dataclass
class ScoredCandidate:
    id: str  # structure fingerprint
    chemical_system: str
    sampler: str
    scores: dict[str, float]  # e.g. {"max_force": 2.1, "mean_force": 0.8}
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    id: str
    rank: int  # 0 = best within its chemical system
    reason: str  # human-readable: why this one was picked


class Selector(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def select(
        self, candidates: Sequence[ScoredCandidate], per_system_budget: int
    ) -> list[Selection]: ...


SELECTORS: Registry[Selector] = Registry("selector")

import_submodules(__name__, __path__)  # registration
