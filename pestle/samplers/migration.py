"""Vacancy migration paths: an ion hops into a neighbouring vacancy. The image chain between
the two vacancy configurations (IDPP or linear, optionally relaxed as a climbing-image NEB
with a potential) samples the saddle region that near-equilibrium training data lacks."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from pestle.plugins import PluginSpec
from pestle.samplers import (
    SAMPLERS,
    Candidate,
    PotentialSpec,
    Seed,
    default_potential,
    displace,
    sampler_rng,
)
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


def void_sites(host: Atoms, tolerance: float = 0.05) -> tuple[np.ndarray, float]:
    """Cartesian centres of the largest empty spheres of a periodic cell, and their radius.

    Candidates are the Voronoi vertices of the atoms (with their periodic images): points
    equidistant from four or more atoms, where interstitials sit (octahedral, tetrahedral...).
    The largest class (within ``tolerance`` A of the largest radius) is returned, one point per
    site after wrapping into the cell.
    """
    from ase.geometry import get_distances
    from scipy.spatial import Voronoi

    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    images = (host.get_scaled_positions()[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    vertices = Voronoi(images @ host.cell.array).vertices
    fractional = host.cell.scaled_positions(vertices)
    inside = vertices[np.all((fractional >= -1e-9) & (fractional < 1 - 1e-9), axis=1)]
    _, distances = get_distances(inside, host.positions, cell=host.cell, pbc=True)
    radius = distances.min(axis=1)
    best = inside[radius >= radius.max() - tolerance]
    unique: list[np.ndarray] = []
    for point in best:
        if not unique:
            unique.append(point)
            continue
        _, d = get_distances([point], unique, cell=host.cell, pbc=True)
        if d.min() > 0.1:
            unique.append(point)
    return np.array(unique), float(radius.max())


def interstitial_hops(host: Atoms, species: str) -> list[tuple]:
    """(path id, initial, final, moving atom, distance) for an extra ``species`` atom hopping
    from the largest void nearest the cell centre to the nearest equivalent void."""
    from ase.geometry import get_distances

    sites, _ = void_sites(host)
    if len(sites) < 2:
        return []
    centre = host.cell.array.sum(axis=0) / 2
    start = int(np.argmin(np.linalg.norm(sites - centre, axis=1)))
    vectors, distances = get_distances([sites[start]], sites, cell=host.cell, pbc=True)
    distances, vectors = distances[0], vectors[0]
    # The nearest equivalent void: equal-length hops to the others are the same path.
    end = next(int(i) for i in np.argsort(distances) if i != start)
    initial = host + Atoms(species, positions=[sites[start]])
    final = host + Atoms(species, positions=[sites[start] + vectors[end]])
    path_id = f"{species}-int-{start}-{end}-d{distances[end]:.3f}"
    return [(path_id, initial, final, len(host), float(distances[end]))]


@SAMPLERS.register("migration")
class MigrationSampler:
    """Vacancy hops between symmetry-distinct neighbouring sites, every image a candidate."""

    drives_with_potential: ClassVar[bool] = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        species: str = Field(description="element whose vacancy migrates")
        kind: Literal["vacancy", "interstitial"] = Field(
            default="vacancy",
            description="vacancy: an ion hops into a neighbouring vacancy; interstitial: an "
            "extra ion hops between the cell's largest voids",
        )
        min_supercell_length: float = Field(default=7.0, gt=0, description="Angstrom")
        max_hop_distance: float | None = Field(
            default=None, gt=0, description="Angstrom; default: the nearest shell"
        )
        n_images: int = Field(default=5, ge=1, le=15, description="intermediate images")
        interpolation: Literal["idpp", "linear"] = Field(
            default="idpp",
            description="initial image chain: image-dependent pair potential or linear",
        )
        relax: bool = Field(default=False, description="climbing-image NEB with the potential")
        predict_barrier: bool = Field(
            default=True,
            description="record the potential's energy of every image and the barrier in the "
            "candidates' params",
        )
        potential: PotentialSpec = Field(
            default_factory=default_potential,
            description="the potential for the NEB relaxation and the predicted barrier",
        )
        fmax: float = Field(default=0.1, gt=0, description="eV/Angstrom, relaxations")
        max_steps: int = Field(
            default=200, ge=1, description="optimiser steps of the NEB relaxation"
        )
        max_paths: int = Field(
            default=4, ge=1, description="distinct hops per seed (each gives n_images + 2 images)"
        )
        rattle: float = Field(
            default=0.0, ge=0, le=0.5, description="Gaussian displacement of every image, Angstrom"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def with_potential(self, spec: PluginSpec) -> MigrationSampler:
        return MigrationSampler(self.params.model_copy(update={"potential": spec}))

    def check_structures(self, structures, name: str | None = None) -> None:
        for atoms in structures:
            if self.params.species not in atoms.get_chemical_symbols():
                raise ValueError(f"migration: species {self.params.species!r} is not in seed "
                                 f"{name or atoms.get_chemical_formula()}")  # fmt: skip

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        p = self.params
        self.check_structures([seed.atoms], seed.name)
        repeat = diagonal_supercell(seed.atoms, p.min_supercell_length)
        host = seed.atoms.repeat(repeat)
        hops = (
            self._vacancy_hops(seed, host)
            if p.kind == "vacancy"
            else interstitial_hops(host, p.species)
        )[: p.max_paths]
        calculator = None
        if p.relax or p.predict_barrier:
            from pestle.potentials import POTENTIALS
            from pestle.potentials.calculator import PotentialCalculator

            calculator = PotentialCalculator(POTENTIALS.build_spec(p.potential))
        children = sampler_rng(rng_seed).integers(0, 2**63 - 1, size=len(hops))
        candidates = []
        for (path_id, initial, final, moving, distance), child in zip(hops, children, strict=True):
            images = self._path(initial, final, calculator)
            energies = None
            if calculator is not None:
                energies = []
                for image in images:
                    image.calc = calculator
                    energies.append(float(image.get_potential_energy()))
            barrier = None if energies is None else max(energies) - energies[0]
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

    def _vacancy_hops(self, seed: Seed, host: Atoms) -> list[tuple]:
        """(path id, initial, final, moving atom, distance) per distinct vacancy hop.

        Hops are told apart by the start site's symmetry class and the hop length (to
        1e-3 A): equal-length hops from equivalent sites are taken as equivalent."""
        p = self.params
        paths: dict[tuple[int, float], tuple[int, int, float]] = {}
        species_sites = [i for i in distinct_sites(seed.atoms) if host[i].symbol == p.species]
        for site in species_sites:
            for neighbour, distance in vacancy_hops(host, site, p.species, p.max_hop_distance):
                paths.setdefault((site, round(distance, 3)), (site, neighbour, distance))
        hops = []
        for site, neighbour, distance in sorted(paths.values(), key=lambda t: (t[2], t[0], t[1])):
            initial, final, moving = hop_endpoints(host, site, neighbour)
            path_id = f"{p.species}-vac-{site}-{neighbour}-d{distance:.3f}"
            hops.append((path_id, initial, final, moving, distance))
        return hops

    def _path(self, initial: Atoms, final: Atoms, calculator) -> list[Atoms]:
        from ase.mep import NEB
        from ase.optimize import FIRE

        p = self.params
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
                log.warning("migration NEB not converged in %d steps", p.max_steps)
        return images
