"""Samplers: make off-equilibrium candidates from seed structures.

Protocol: a registered class with a nested pydantic ``Params`` model and
``sample(seed, rng) -> list[Candidate]``. Deterministic for a given ``rng`` seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel

from pestle.registry import Registry


@dataclass
class Seed:
    """A starting structure: ``id`` is its fingerprint, ``source`` where it came from."""

    atoms: Atoms
    id: str
    name: str
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    """An off-equilibrium structure with the provenance of how it was made."""

    atoms: Atoms
    sampler: str
    params: dict[str, Any]  # the parameters that produced this very structure
    parent_id: str  # fingerprint of the seed
    rng_seed: int


class Sampler(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]: ...


SAMPLERS: Registry[Sampler] = Registry("sampler")


def sampler_rng(rng_seed: int) -> np.random.Generator:
    return np.random.default_rng(rng_seed)


from pestle.samplers import rattle, strain  # noqa: E402,F401  (registration)
