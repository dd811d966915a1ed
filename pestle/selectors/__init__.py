"""Selectors: choose which scored candidates deserve a reference label.

Protocol: a registered class with a nested pydantic ``Params`` model and
``select(candidates, budget) -> list[Selection]``. Deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from pestle.plugins import Contract, Registry, import_submodules

# ScoredCandidate.extra keys: the candidate's descriptor (when the run stored some), and its
# trace of strain relative to its seed (dV/V to first order, from samplers that record one).
EMBEDDING = "embedding"
VOLUMETRIC_STRAIN = "volumetric_strain"


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


SELECTORS: Registry[Selector] = Registry(
    "selector", "pestle.selectors", Contract(methods=("select",))
)


def group_by_system(
    candidates: Sequence[ScoredCandidate], score: str, selector: str
) -> dict[str, list[ScoredCandidate]]:
    """Candidates per chemical system, each group in id order (so no choice depends on the
    input order); every candidate must carry the score a selector ranks by."""
    missing = [c.id for c in candidates if score not in c.scores]
    if missing:
        available = sorted(candidates[0].scores) if candidates else []
        raise KeyError(
            f"selector {selector}: {len(missing)} candidates have no score {score!r} "
            f"(e.g. {missing[0]}); available: {available}"
        )
    groups: dict[str, list[ScoredCandidate]] = {}
    for c in sorted(candidates, key=lambda c: c.id):
        groups.setdefault(c.chemical_system, []).append(c)
    return dict(sorted(groups.items()))


import_submodules(__name__, __path__)  # registration
