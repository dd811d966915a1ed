"""Point defects in supercells: vacancies, substitutions, interstitials, kept charge-neutral.

pestle labels neutral cells. In an ionic crystal (pymatgen finds oxidation states) a single
vacancy or interstitial would leave a charge the DFT cell cannot hold honestly, so those come
as neutral complexes: Schottky groups (a cation with the nearest anions that balance it),
Frenkel pairs (a cation moved to an interstitial site) and isovalent substitutions only.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from ase import Atoms
from ase.geometry import get_distances
from pydantic import BaseModel, ConfigDict, Field

from pestle.samplers import SAMPLERS, Candidate, Seed, displace, sampler_rng


def oxidation_states(atoms: Atoms) -> dict[str, float]:
    """Most likely oxidation state per element; empty for metals and covalent solids."""
    from pymatgen.core import Composition

    guesses = Composition(atoms.get_chemical_formula()).oxi_state_guesses(max_sites=-50)
    if not guesses or all(abs(v) < 1e-8 for v in guesses[0].values()):
        return {}
    return {str(k): float(v) for k, v in guesses[0].items()}


def distinct_sites(atoms: Atoms, symprec: float = 1e-3) -> list[int]:
    """One representative index per set of symmetry-equivalent atoms."""
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    return sorted({int(i) for i in dataset.equivalent_atoms})


def diagonal_supercell(atoms: Atoms, min_length: float) -> list[int]:
    """Smallest repeat along each lattice vector making it at least ``min_length`` long."""
    return [max(1, math.ceil(min_length / length)) for length in atoms.cell.lengths()]


def largest_void(atoms: Atoms, grid: int = 16) -> np.ndarray:
    """Cartesian point farthest from every atom (periodic), on a grid of the cell."""
    axis = (np.arange(grid) + 0.5) / grid
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    cartesian = points @ atoms.cell.array
    _, distances = get_distances(cartesian, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    return cartesian[int(np.argmax(distances.min(axis=1)))]


@SAMPLERS.register("defect")
class DefectSampler:
    """Vacancies, substitutions and interstitials in a supercell, charge-neutral only."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        kinds: list[Literal["vacancy", "substitution", "interstitial"]] = Field(
            default=["vacancy", "substitution"],
            min_length=1,
            description="defects to make (in ionic crystals as neutral complexes: Schottky "
            "groups, Frenkel pairs, isovalent substitutions)",
        )
        substitutions: dict[str, list[str]] = Field(
            default_factory=dict, description="host element -> dopant elements"
        )
        min_supercell_length: float = Field(default=8.0, gt=0, description="Angstrom")
        max_atoms: int = Field(
            default=128, ge=2, description="largest supercell (atoms) a seed may need; larger fails"
        )
        rattle: float = Field(default=0.02, ge=0, le=0.5, description="Gaussian, Angstrom")

    def __init__(self, params: Params) -> None:
        self.params = params

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        from pymatgen.core import Element

        p = self.params
        repeat = diagonal_supercell(seed.atoms, p.min_supercell_length)
        host = seed.atoms.repeat(repeat)
        if len(host) > p.max_atoms + 1:
            raise ValueError(
                f"defect: a {repeat} supercell of {seed.name} has {len(host)} atoms, above "
                f"max_atoms={p.max_atoms}; lower min_supercell_length"
            )
        charges = oxidation_states(seed.atoms)
        # ase's repeat keeps the seed's atoms first, so seed index i is supercell index i.
        sites = distinct_sites(seed.atoms)
        symbols = host.get_chemical_symbols()
        made: list[tuple[Atoms, dict]] = []
        for kind in p.kinds:
            for site in sites:
                element = symbols[site]
                charge = charges.get(element, 0.0)
                if kind == "vacancy":
                    remove = [site]
                    if charge < 0:
                        continue  # each Schottky group is made once, from its cation
                    if charge:
                        remove = self._balancing_group(host, site, charges)
                        if remove is None:
                            continue
                    atoms = host.copy()
                    del atoms[remove]
                    removed = [symbols[i] for i in remove]
                    label = "schottky" if len(remove) > 1 else "vacancy"
                    made.append((atoms, {"defect": label, "site": site, "removed": removed,
                                         "removed_indices": remove}))  # fmt: skip
                elif kind == "substitution":
                    for dopant in p.substitutions.get(element, []):
                        if charge and charge not in Element(dopant).common_oxidation_states:
                            continue  # aliovalent: would charge the cell
                        atoms = host.copy()
                        atoms[site].symbol = dopant
                        made.append((atoms, {"defect": "substitution", "site": site,
                                             "host": element, "dopant": dopant}))  # fmt: skip
                elif kind == "interstitial":
                    if charge < 0:
                        continue  # anion interstitials: only the cation Frenkel pairs below
                    atoms = host.copy()
                    void = largest_void(host)
                    if charge:  # Frenkel pair: the ion leaves its site for the void
                        atoms.positions[site] = void
                        made.append((atoms, {"defect": "frenkel", "site": site,
                                             "species": element}))  # fmt: skip
                    else:
                        atoms += Atoms(element, positions=[void])
                        made.append((atoms, {"defect": "interstitial", "site": site,
                                             "species": element}))  # fmt: skip
        children = sampler_rng(rng_seed).integers(0, 2**63 - 1, size=max(len(made), 1))
        candidates = []
        for index, (atoms, info) in enumerate(made):
            child_seed = int(children[index])
            displace(atoms, p.rattle, sampler_rng(child_seed))
            candidates.append(
                Candidate(
                    atoms=atoms,
                    sampler=self.name,
                    params={**info, "supercell": repeat, "rattle": p.rattle,
                            "neutral_by_pairing": info["defect"] in ("schottky", "frenkel")},
                    parent_id=seed.id,
                    rng_seed=child_seed,
                )
            )  # fmt: skip
        return candidates

    @staticmethod
    def _balancing_group(host: Atoms, site: int, charges: dict[str, float]) -> list[int] | None:
        """``site`` plus the nearest counter-ions of one species whose charges cancel it."""
        symbols = host.get_chemical_symbols()
        charge = charges[symbols[site]]
        distances = host.get_distances(site, range(len(host)), mic=True)
        for element, other in sorted(charges.items()):
            if other * charge >= 0:
                continue
            count = -charge / other
            if abs(count - round(count)) > 1e-6:
                continue
            partners = [i for i in np.argsort(distances) if symbols[i] == element][: round(count)]
            return [site, *[int(i) for i in partners]]
        return None
