"""Random solid solutions: a fraction of one sublattice's sites taken by another element."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pestle.samplers import SAMPLERS, Candidate, Seed, displace, sampler_rng
from pestle.samplers.rattle import Supercell, make_supercell


def _common_states(symbol: str) -> set[int]:
    from pymatgen.core import Element

    return set(Element(symbol).common_oxidation_states)


@SAMPLERS.register("solid_solution")
class SolidSolutionSampler:
    """Random isovalent substitution of a fraction of the host sublattice."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        host: str = Field(description="element whose sites are substituted")
        substituent: str = Field(description="element put on the host's sites")
        fractions: list[float] = Field(
            default=[0.25, 0.5],
            min_length=1,
            description="fractions of the host's sites substituted, each in (0, 1)",
        )
        per_fraction: int = Field(default=2, ge=1, description="random arrangements per fraction")
        supercell: Supercell = Field(
            default=(2, 2, 2), description="repetitions of the seed along its cell vectors"
        )
        rattle: float = Field(default=0.02, ge=0, le=0.5, description="Gaussian, Angstrom")

        @field_validator("fractions")
        @classmethod
        def _open_interval(cls, value: list[float]) -> list[float]:
            if any(not 0 < f < 1 for f in value):
                raise ValueError("fractions must lie strictly between 0 and 1")
            return value

    def __init__(self, params: Params) -> None:
        self.params = params

    def check_structures(self, structures, name: str | None = None) -> None:
        for atoms in structures:
            if self.params.host not in atoms.get_chemical_symbols():
                raise ValueError(f"solid_solution: host {self.params.host!r} is not in seed "
                                 f"{name or atoms.get_chemical_formula()}")  # fmt: skip

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        from pestle.samplers.defect import oxidation_states

        p = self.params
        charges = oxidation_states(seed.atoms)
        self.check_structures([seed.atoms], seed.name)
        host_charge = charges.get(p.host)
        if host_charge and round(host_charge) not in _common_states(p.substituent):
            raise ValueError(
                f"solid_solution: substituent {p.substituent} has no common oxidation state "
                f"{host_charge:+g} of {p.host} in {seed.name}; an aliovalent swap would charge "
                "the cell"
            )
        base = make_supercell(seed.atoms, p.supercell)
        sites = np.flatnonzero(np.array(base.get_chemical_symbols()) == p.host)
        children = sampler_rng(rng_seed).integers(
            0, 2**63 - 1, size=len(p.fractions) * p.per_fraction
        )
        candidates = []
        for index, child in enumerate(children):
            fraction = p.fractions[index // p.per_fraction]
            count = max(1, min(len(sites) - 1, round(fraction * len(sites))))
            rng = sampler_rng(int(child))
            chosen = np.sort(rng.choice(sites, size=count, replace=False))
            atoms = base.copy()
            symbols = atoms.get_chemical_symbols()
            for i in chosen:
                symbols[i] = p.substituent
            atoms.set_chemical_symbols(symbols)
            displace(atoms, p.rattle, rng)
            candidates.append(
                Candidate(
                    atoms=atoms,
                    sampler=self.name,
                    params={
                        "host": p.host,
                        "substituent": p.substituent,
                        "requested_fraction": fraction,
                        "fraction": count / len(sites),
                        "substituted_sites": [int(i) for i in chosen],
                        "supercell": list(p.supercell),
                        "rattle": p.rattle,
                        "index": index,
                    },
                    parent_id=seed.id,
                    rng_seed=int(child),
                )
            )
        return candidates
