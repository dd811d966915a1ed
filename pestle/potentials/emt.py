"""ASE's effective-medium theory as a Potential: an instant, analytic stand-in for a
machine-learned model where a test or demo needs exact forces (e.g. energy conservation
in MD on Cu, Ag, Au, Ni, Pd, Pt, Al)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import ase
from ase import Atoms
from ase.calculators.emt import EMT, parameters
from pydantic import BaseModel, ConfigDict

from pestle.potentials import POTENTIALS, Prediction


@POTENTIALS.register("emt")
class EMTPotential:
    supports_embeddings: ClassVar[bool] = False
    checkpoint_params: ClassVar[tuple[str, str] | None] = None  # analytic: nothing to load

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def check_structures(self, structures: Sequence[Atoms]) -> None:
        unsupported = sorted({s for atoms in structures for s in atoms.get_chemical_symbols()}
                             - set(parameters))  # fmt: skip
        if unsupported:
            raise ValueError(
                f"EMT has no parameters for {', '.join(unsupported)} "
                f"(it knows {', '.join(sorted(parameters))})"
            )

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        self.check_structures(structures)
        out = []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = EMT()
            voigt = atoms.get_stress(voigt=True) if stress and atoms.pbc.all() else None
            out.append(Prediction(atoms.get_potential_energy(), atoms.get_forces(), voigt))
        return out

    def describe(self) -> dict:
        return {"family": "emt", "ase_version": ase.__version__}
