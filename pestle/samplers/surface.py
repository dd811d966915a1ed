"""Surface slabs: every symmetrically distinct Miller index up to a maximum, every termination,
from pymatgen's SlabGenerator. Universal potentials see few surfaces in training; broken
bonds are where their softening shows most."""

from __future__ import annotations

import logging

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pestle.samplers import SAMPLERS, Candidate, Seed, displace, sampler_rng

log = logging.getLogger("pestle.samplers.surface")


@SAMPLERS.register("surface")
class SurfaceSampler:
    """Slabs for all distinct Miller indices up to max_index, every termination."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_index: int = Field(
            default=1, ge=1, le=3, description="largest Miller index of the distinct facets cut"
        )
        min_slab_size: float = Field(default=6.0, gt=0, description="slab thickness, Angstrom")
        min_vacuum_size: float = Field(default=10.0, gt=0, description="vacuum gap, Angstrom")
        symmetric: bool = Field(
            default=True, description="prefer slabs with equivalent top and bottom surfaces"
        )
        stoichiometric: bool = Field(
            default=True,
            description="only slabs with the bulk's composition (symmetric ones where any "
            "exist, else the plain terminations)",
        )
        max_atoms: int = Field(default=64, ge=1, description="slabs above this are skipped")
        rattle: float = Field(default=0.0, ge=0, le=0.5, description="Gaussian, Angstrom")

    def __init__(self, params: Params) -> None:
        self.params = params

    def _keep(self, slabs: list, bulk) -> list:
        if not self.params.stoichiometric:
            return slabs
        formula = bulk.composition.reduced_formula
        return [s for s in slabs if s.composition.reduced_formula == formula]

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        from pymatgen.core.surface import SlabGenerator, get_symmetrically_distinct_miller_indices
        from pymatgen.io.ase import AseAtomsAdaptor
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        p = self.params
        # Miller indices refer to the conventional cell, as crystallographers quote them.
        bulk = SpacegroupAnalyzer(
            AseAtomsAdaptor.get_structure(seed.atoms)
        ).get_conventional_standard_structure()
        slabs = []
        for miller in get_symmetrically_distinct_miller_indices(bulk, p.max_index):
            generator = SlabGenerator(
                bulk,
                miller,
                p.min_slab_size,
                p.min_vacuum_size,
                lll_reduce=True,
                center_slab=True,
                primitive=True,
            )
            found, symmetric = [], False
            if p.symmetric:
                found = self._keep(generator.get_slabs(symmetrize=True), bulk)
                symmetric = bool(found)
            if not found:  # no (stoichiometric) symmetric termination: the plain ones
                found = self._keep(generator.get_slabs(), bulk)
            for termination, slab in enumerate(found):
                slabs.append((tuple(int(i) for i in miller), termination, symmetric, slab))
        children = sampler_rng(rng_seed).integers(0, 2**63 - 1, size=max(len(slabs), 1))
        candidates, skipped = [], 0
        for index, (miller, termination, symmetric, slab) in enumerate(slabs):
            if len(slab) > p.max_atoms:
                skipped += 1
                continue
            atoms = AseAtomsAdaptor.get_atoms(slab.get_orthogonal_c_slab())
            atoms.pbc = True  # a periodic slab: the vacuum along c separates the images
            child_seed = int(children[index])
            displace(atoms, p.rattle, sampler_rng(child_seed))
            z = atoms.positions[:, 2]
            thickness = float(z.max() - z.min())
            candidates.append(
                Candidate(
                    atoms=atoms,
                    sampler=self.name,
                    params={
                        "miller_index": list(miller),
                        "termination": termination,
                        "shift": round(float(slab.shift), 6),
                        "symmetric": symmetric,
                        "polar": bool(slab.is_polar()),
                        "thickness": round(thickness, 4),
                        "vacuum": round(float(atoms.cell.lengths()[2]) - thickness, 4),
                        "rattle": p.rattle,
                        "index": index,
                    },
                    parent_id=seed.id,
                    rng_seed=child_seed,
                )
            )
        if skipped:
            log.info("surface: %d slabs above max_atoms=%d skipped", skipped, p.max_atoms)
        return candidates


def surface_normal(atoms) -> np.ndarray:
    """Unit normal of the slab plane spanned by the first two lattice vectors."""
    normal = np.cross(atoms.cell[0], atoms.cell[1])
    return normal / np.linalg.norm(normal)
