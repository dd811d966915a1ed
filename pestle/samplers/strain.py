"""Random homogeneous strains: symmetric strain tensors up to a maximum principal strain."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pestle.samplers import SAMPLERS, Candidate, Seed, displace, sampler_rng
from pestle.samplers.rattle import Supercell, make_supercell


def random_strain(rng: np.random.Generator, max_strain: float) -> np.ndarray:
    """A symmetric 3x3 small-strain tensor: principal strains uniform in
    [-max_strain, max_strain], principal axes in a uniformly random orientation."""
    principal = rng.uniform(-max_strain, max_strain, size=3)
    # Random rotation from the QR decomposition of a Gaussian matrix (Haar measure).
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q @ np.diag(principal) @ q.T


def strain_tensors(
    mode: str, count: int, max_strain: float, children: np.ndarray
) -> list[np.ndarray]:
    """``count`` strain tensors: random orientations, an isotropic E-V scan, or pure shears."""
    if mode == "random":
        return [random_strain(sampler_rng(int(c)), max_strain) for c in children]
    if mode == "volume":
        # Linear strains evenly over [-max, max]: volumes (1 + e)^3 V0 bracket the minimum.
        values = np.linspace(-max_strain, max_strain, count) if count > 1 else [max_strain]
        return [e * np.eye(3) for e in values]
    tensors = []  # shear: each plane in turn, magnitudes evenly over (0, max]
    planes = ((0, 1), (0, 2), (1, 2))
    for index in range(count):
        i, j = planes[index % 3]
        magnitude = max_strain * (index // 3 + 1) / ((count - 1) // 3 + 1)
        tensor = np.zeros((3, 3))
        tensor[i, j] = tensor[j, i] = magnitude
        tensors.append(tensor)
    return tensors


@SAMPLERS.register("strain")
class StrainSampler:
    """Homogeneous strains: random symmetric tensors, isotropic volume scans or pure shears."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        mode: Literal["random", "volume", "shear"] = Field(
            default="random",
            description="random: symmetric tensors of random orientation; volume: isotropic "
            "strains evenly over [-max_strain, max_strain]; shear: pure shears plane by plane",
        )

        max_strain: float = Field(
            default=0.05, gt=0, le=0.3, description="largest |principal strain|"
        )
        count: int = Field(default=5, ge=1, le=10_000, description="strained cells per seed")
        rattle: float = Field(
            default=0.0,
            ge=0,
            le=1.0,
            description="optional Gaussian displacement (A) on top, so forces are not all zero",
        )
        supercell: Supercell = Field(
            default=(1, 1, 1), description="repetitions of the seed along its cell vectors"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        base = make_supercell(seed.atoms, self.params.supercell)
        children = sampler_rng(rng_seed).integers(0, 2**63 - 1, size=self.params.count)
        strains = strain_tensors(
            self.params.mode, self.params.count, self.params.max_strain, children
        )
        candidates = []
        for index, child in enumerate(children):
            child_seed = int(child)
            # The random strain used this generator first; rattling continues from it.
            rng = sampler_rng(child_seed)
            if self.params.mode == "random":
                random_strain(rng, self.params.max_strain)
            strain = strains[index]
            atoms = base.copy()
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
            displace(atoms, self.params.rattle, rng)
            candidates.append(
                Candidate(
                    atoms=atoms,
                    sampler=self.name,
                    params={
                        "mode": self.params.mode,
                        "strain": (np.round(strain, 10) + 0.0).tolist(),  # no -0.0
                        "volumetric_strain": float(np.trace(strain)),
                        "max_strain": self.params.max_strain,
                        "rattle": self.params.rattle,
                        "supercell": list(self.params.supercell),
                        "index": index,
                    },
                    parent_id=seed.id,
                    rng_seed=child_seed,
                )
            )
        return candidates
