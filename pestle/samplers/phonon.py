"""Phonopy finite-displacement supercells: the structures whose forces give the harmonic
force constants, at an amplitude of the user's choosing (larger ones probe anharmonicity)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from pestle.samplers import SAMPLERS, Candidate, Seed
from pestle.samplers.rattle import Supercell


def to_phonopy(atoms: Atoms):
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=atoms.cell.array,
        scaled_positions=atoms.get_scaled_positions(),
    )


def from_phonopy(cell) -> Atoms:
    return Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def displaced_supercells(
    atoms: Atoms, supercell: Supercell, amplitude: float, plus_minus: bool | str, symprec: float
):
    """(phonopy object, its displaced supercells) for ``atoms``."""
    from phonopy import Phonopy

    phonon = Phonopy(
        to_phonopy(atoms),
        supercell_matrix=np.diag(supercell),
        primitive_matrix="auto",
        symprec=symprec,
    )
    phonon.generate_displacements(distance=amplitude, is_plusminus=plus_minus)
    return phonon, phonon.supercells_with_displacements


@SAMPLERS.register("phonon")
class PhononSampler:
    """Phonopy's symmetry-reduced finite displacements, one displaced atom per structure."""

    requires_extra: ClassVar[str] = "phonon"  # pip install 'pestle[phonon]'

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        supercell: Supercell = Field(
            default=(2, 2, 2), description="phonopy supercell: repetitions along the cell vectors"
        )
        amplitude: float = Field(default=0.03, gt=0, le=0.5, description="Angstrom")
        plus_minus: Literal["auto", True, False] = Field(
            default="auto",
            description="also the opposite displacements: auto (where symmetry does not give "
            "them), always, never",
        )
        symprec: float = Field(
            default=1e-5, gt=0, description="symmetry tolerance (Angstrom) phonopy uses"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        import phonopy

        p = self.params
        phonon, cells = displaced_supercells(
            seed.atoms, p.supercell, p.amplitude, p.plus_minus, p.symprec
        )
        candidates = []
        for index, (cell, displacement) in enumerate(
            zip(cells, phonon.dataset["first_atoms"], strict=True)
        ):
            candidates.append(
                Candidate(
                    atoms=from_phonopy(cell),
                    sampler=self.name,
                    params={
                        "displacement_index": index,
                        "atom": int(displacement["number"]),
                        "displacement": np.round(displacement["displacement"], 10).tolist(),
                        "supercell": list(p.supercell),
                        "amplitude": p.amplitude,
                        "symprec": p.symprec,
                        "phonopy_version": phonopy.__version__,
                    },
                    parent_id=seed.id,
                    rng_seed=rng_seed,  # unused: the displacements are deterministic
                )
            )
        return candidates
