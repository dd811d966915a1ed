"""Samplers: make off-equilibrium candidates from seed structures.

Protocol: a registered class with a nested pydantic ``Params`` model and
``sample(seed, rng) -> list[Candidate]``. Deterministic for a given ``rng`` seed.

A sampler that drives dynamics or relaxations with a potential (``md``, ``migration``,
Boltzmann-weighted ``rattle``) declares ``drives_with_potential = True``, takes the potential
as a ``potential: PluginSpec`` param and implements ``with_potential(spec)``, so the daemon
can run it with the model it promoted (``with_potential`` below does that for a config).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel

from pestle.plugins import (
    Contract,
    PluginSpec,
    Registry,
    accepts_any_structures,
    default_name,
    import_submodules,
)


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
    """A class that leaves ``drives_with_potential`` out declares False on registration."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    drives_with_potential: ClassVar[bool]

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]: ...

    def check_structures(self, structures: Sequence[Atoms]) -> None:
        """Raise ValueError when this sampler cannot handle these structures (e.g. elements it
        has no parameters for). Run on the seeds before a run starts; optional (the default
        accepts any)."""

    def with_potential(self, spec: PluginSpec) -> Sampler:
        """A copy driving its dynamics with potential ``spec``; only promised when
        ``drives_with_potential`` is True."""
        ...


SAMPLERS: Registry[Sampler] = Registry(
    "sampler",
    "pestle.samplers",
    Contract(
        methods=("sample",),
        defaults={"drives_with_potential": False, "check_structures": accepts_any_structures},
        promises={"drives_with_potential": ("with_potential",)},
    ),
)

# The ``potential`` param of samplers that drive with one: a registered potential's name and
# params, CHGNet when the name is left out.
PotentialSpec = Annotated[PluginSpec, default_name("chgnet")]


def default_potential() -> PluginSpec:
    return PluginSpec(name="chgnet")


def with_potential(specs: Sequence[PluginSpec], potential: PluginSpec) -> list[PluginSpec]:
    """Copies of sampler ``specs`` in which every sampler that drives its dynamics with a
    potential uses ``potential`` instead (e.g. the promoted model); the rest are unchanged.

    Each sampler's own ``with_potential`` decides what changes; the spec keeps the params
    as written and takes only the params that change (as JSON-ready values)."""
    swapped = []
    for spec in specs:
        params = copy.deepcopy(spec.params)
        if SAMPLERS.get(spec.name).drives_with_potential:
            before = SAMPLERS.build_spec(spec)
            old = before.params.model_dump(mode="json")
            new = before.with_potential(potential).params.model_dump(mode="json")
            params |= {key: value for key, value in new.items() if old.get(key) != value}
        swapped.append(PluginSpec(name=spec.name, params=params))
    return swapped


def sampler_rng(rng_seed: int) -> np.random.Generator:
    return np.random.default_rng(rng_seed)


def displace(atoms: Atoms, amplitude: float, rng: np.random.Generator) -> Atoms:
    """Gaussian displacement (standard deviation ``amplitude`` in Angstrom per axis) of every
    atom, in place; nothing at zero amplitude. Returns ``atoms``."""
    if amplitude > 0:
        atoms.positions += rng.normal(0.0, amplitude, size=(len(atoms), 3))
    return atoms


import_submodules(__name__, __path__)  # registration
