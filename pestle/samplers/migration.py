"""Vacancy migration paths: an ion hops into a neighbouring vacancy. The image chain between
the two vacancy configurations (IDPP or linear, optionally relaxed as a climbing-image NEB
with a potential) samples the saddle region that near-equilibrium training data lacks."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from pestle.samplers import SAMPLERS, Candidate, PotentialChoice, Seed, displace, sampler_rng
from pestle.samplers.defect import diagonal_supercell, distinct_sites

log = logging.getLogger("pestle.samplers.migration")


def vacancy_hops(
    host: Atoms, site: int, species: str, max_distance: float | None
) -> list[tuple[int, float]]:
    """(neighbour index, distance) of same-species neighbours of ``site`` a vacancy can take
    an ion from: the nearest shell, or every one within ``max_distance``."""
    symbols = np.array(host.get_chemical_symbols())
    distances = host.get_distances(site, range(len(host)), mic=True)
    same = np.flatnonzero((symbols == species) & (np.arange(len(host)) != site))
    nearest = distances[same].min()
    cutoff = max_distance if max_distance is not None else 1.1 * nearest
    return [(int(i), float(distances[i])) for i in same if distances[i] <= cutoff + 1e-8]


def hop_endpoints(host: Atoms, site: int, neighbour: int) -> tuple[Atoms, Atoms, int]:
    """Initial (vacancy at ``site``) and final (vacancy at ``neighbour``) configurations with
    identical atom order; returns them and the index of the moving atom in both."""
    initial = host.copy()
    start = initial.positions[neighbour].copy()
    # The ion goes the short way, across the boundary if that is nearer.
    hop = host.get_distance(neighbour, site, mic=True, vector=True)
    final = host.copy()
    final.positions[neighbour] = start + hop
    del initial[site]
    del final[site]
    moving = neighbour - (1 if neighbour > site else 0)
    return initial, final, moving


@SAMPLERS.register("migration")
class MigrationSampler:
    """Vacancy hops between symmetry-distinct neighbouring sites, every image a candidate."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        species: str = Field(description="element whose vacancy migrates")
        kind: Literal["vacancy"] = "vacancy"
        min_supercell_length: float = Field(default=7.0, gt=0, description="Angstrom")
        max_hop_distance: float | None = Field(
            default=None, gt=0, description="Angstrom; default: the nearest shell"
        )
        n_images: int = Field(default=5, ge=1, le=15, description="intermediate images")
        interpolation: Literal["idpp", "linear"] = "idpp"
        relax: bool = Field(default=False, description="climbing-image NEB with the potential")
        predict_barrier: bool = True
        potential: PotentialChoice = Field(default_factory=PotentialChoice)
        fmax: float = Field(default=0.1, gt=0, description="eV/Angstrom, relaxations")
        max_steps: int = Field(default=200, ge=1)
        max_paths: int = Field(default=4, ge=1)
        rattle: float = Field(default=0.0, ge=0, le=0.5)

    def __init__(self, params: Params) -> None:
        self.params = params

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        p = self.params
        if p.species not in seed.atoms.get_chemical_symbols():
            raise ValueError(f"migration: species {p.species!r} is not in seed {seed.name}")
        repeat = diagonal_supercell(seed.atoms, p.min_supercell_length)
        host = seed.atoms.repeat(repeat)
        # Hops are told apart by the start site's symmetry class and the hop length (to
        # 1e-3 A): equal-length hops from equivalent sites are taken as equivalent.
        paths: dict[tuple[int, float], tuple[int, int, float]] = {}
        species_sites = [i for i in distinct_sites(seed.atoms) if host[i].symbol == p.species]
        for site in species_sites:
            for neighbour, distance in vacancy_hops(host, site, p.species, p.max_hop_distance):
                paths.setdefault((site, round(distance, 3)), (site, neighbour, distance))
        chosen = sorted(paths.values(), key=lambda t: (t[2], t[0], t[1]))[: p.max_paths]
        calculator = p.potential.calculator() if (p.relax or p.predict_barrier) else None
        children = sampler_rng(rng_seed).integers(0, 2**63 - 1, size=len(chosen))
        candidates = []
        for (site, neighbour, distance), child in zip(chosen, children, strict=True):
            images, moving = self._path(host, site, neighbour, calculator)
            energies = None
            if calculator is not None:
                energies = []
                for image in images:
                    image.calc = calculator
                    energies.append(float(image.get_potential_energy()))
            barrier = None if energies is None else max(energies) - energies[0]
            path_id = f"{p.species}-vac-{site}-{neighbour}-d{distance:.3f}"
            rng = sampler_rng(int(child))
            for index, image in enumerate(images):
                atoms = image.copy()
                atoms.calc = None
                displace(atoms, p.rattle, rng)
                candidates.append(
                    Candidate(
                        atoms=atoms,
                        sampler=self.name,
                        params={
                            "path_id": path_id,
                            "image_index": index,
                            "n_images": len(images),
                            "hop_distance": round(distance, 6),
                            "moving_atom": moving,
                            "species": p.species,
                            "interpolation": p.interpolation,
                            "relaxed": p.relax,
                            "predicted_energy_eV": None if energies is None else energies[index],
                            "predicted_barrier_eV": barrier,
                            "potential": None
                            if calculator is None
                            else calculator.potential.describe(),
                            "supercell": repeat,
                            "rattle": p.rattle,
                        },
                        parent_id=seed.id,
                        rng_seed=int(child),
                    )
                )
        return candidates

    def _path(self, host: Atoms, site: int, neighbour: int, calculator) -> tuple[list[Atoms], int]:
        from ase.mep import NEB
        from ase.optimize import FIRE

        p = self.params
        initial, final, moving = hop_endpoints(host, site, neighbour)
        if p.relax:
            for endpoint in (initial, final):
                endpoint.calc = calculator
                FIRE(endpoint, logfile=None).run(fmax=p.fmax, steps=p.max_steps)
        images = [initial] + [initial.copy() for _ in range(p.n_images)] + [final]
        neb = NEB(images, climb=p.relax, allow_shared_calculator=True, method="improvedtangent")
        neb.interpolate(method=p.interpolation, mic=True)
        if p.relax:
            for image in images[1:-1]:
                image.calc = calculator
            converged = FIRE(neb, logfile=None).run(fmax=p.fmax, steps=p.max_steps)
            if not converged:
                log.warning("migration NEB %d->%d not converged in %d steps", site, neighbour,
                            p.max_steps)  # fmt: skip
        return images, moving
