"""Potentials: batched energies, forces and stresses from a machine-learned model.

Units follow ASE: energy in eV (total), forces in eV/Angstrom, stress in eV/Angstrom^3 as a
Voigt 6-vector in ASE order (xx, yy, zz, yz, xz, xy), sign convention of ASE (positive = tensile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel

from pestle.registry import Registry, import_submodules


@dataclass
class Prediction:
    energy: float
    forces: np.ndarray  # (n_atoms, 3)
    stress: np.ndarray | None  # (6,) Voigt, eV/A^3


class Potential(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        """``stress=False``: leave stresses out (``None``); scoring needs only energies and
        forces, and the strain derivative is a large share of a forward pass."""
        ...

    def describe(self) -> dict:
        """Identity of the model for provenance: family, version/checkpoint, checksum."""
        ...


POTENTIALS: Registry[Potential] = Registry("potential")

import_submodules(__name__, __path__)  # registration
