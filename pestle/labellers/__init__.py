"""Labellers: reference (DFT or other) energies, forces and stresses for one structure.

Protocol: a registered class with a nested pydantic ``Params`` model, picklable (it travels
to Dask workers), with
- ``level_of_theory() -> dict``: everything that defines the numbers (code and version,
  functional, cutoff, k-points, smearing, setups...). Its hash keys labels, so the same
  structure at the same level of theory is never computed twice.
- ``label(atoms, workdir) -> LabelResult``: raises ``LabelError`` for a calculation that
  ran but must not become a label (SCF not converged, unparsable output).
- ``resources() -> Resources``: what one calculation occupies on a Dask worker (cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel

from pestle.plugins import Contract, Registry, Resources, import_submodules
from pestle.structures import settings_hash


class LabelError(RuntimeError):
    """A calculation finished without a trustworthy result (e.g. SCF not converged)."""


@dataclass
class LabelResult:
    energy: float  # eV, total
    forces: np.ndarray  # (n, 3) eV/A
    stress: np.ndarray | None  # (6,) Voigt eV/A^3, ASE order and sign
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. scf iterations, magmoms


class Labeller(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def level_of_theory(self) -> dict[str, Any]: ...

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult: ...

    def resources(self) -> Resources: ...


def level_of_theory_hash(labeller: Labeller) -> str:
    return settings_hash(labeller.level_of_theory())


LABELLERS: Registry[Labeller] = Registry(
    "labeller", "pestle.labellers", Contract(methods=("level_of_theory", "label", "resources"))
)

import_submodules(__name__, __path__)  # registration
