"""Samplers: make off-equilibrium candidates from seed structures.

Protocol: a registered class with a nested pydantic ``Params`` model and
``sample(seed, rng) -> list[Candidate]``. Deterministic for a given ``rng`` seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from pestle.plugins import Registry, import_submodules


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


def displace(atoms: Atoms, amplitude: float, rng: np.random.Generator) -> Atoms:
    """Gaussian displacement (standard deviation ``amplitude`` in Angstrom per axis) of every
    atom, in place; nothing at zero amplitude. Returns ``atoms``."""
    if amplitude > 0:
        atoms.positions += rng.normal(0.0, amplitude, size=(len(atoms), 3))
    return atoms


class PotentialChoice(BaseModel):
    """The potential a sampler drives dynamics or relaxations with (``md``, ``migration``,
    Boltzmann-weighted ``rattle``): a registered potential's name and params."""

    model_config = ConfigDict(extra="forbid")

    name: str = "chgnet"
    params: dict[str, Any] = Field(default_factory=dict)

    def build(self):
        from pestle.potentials import POTENTIALS

        return POTENTIALS.build(self.name, self.params)

    def calculator(self):
        from pestle.potentials.calculator import PotentialCalculator

        return PotentialCalculator(self.build())


import_submodules(__name__, __path__)  # registration
