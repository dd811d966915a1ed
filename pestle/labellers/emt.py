"""ASE's effective-medium theory as a reference: cheap, deterministic, for tests and demos
of the loop on metals. Not a substitute for DFT in a real campaign."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ase
from ase import Atoms
from ase.calculators.emt import EMT, parameters
from pydantic import BaseModel, ConfigDict

from pestle.labellers import LABELLERS, ConvergenceSetting, LabelError, LabelResult, convention
from pestle.labellers.gpaw import check_result
from pestle.plugins import Resources


def emt_unsupported(structures) -> str | None:
    """Why EMT cannot compute these structures (elements it has no parameters for)."""
    unsupported = sorted({s for atoms in structures for s in atoms.get_chemical_symbols()}
                         - set(parameters))  # fmt: skip
    if unsupported:
        return (
            f"EMT has no parameters for {', '.join(unsupported)} "
            f"(it knows {', '.join(sorted(parameters))})"
        )
    return None


@LABELLERS.register("emt")
class EMTLabeller:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, params: Params) -> None:
        self.params = params

    def resources(self) -> Resources:
        return Resources(cpus=1)  # serial and instant

    def level_of_theory(self) -> dict[str, Any]:
        return {"code": "ase-emt", "version": ase.__version__}

    def check_structures(self, structures) -> None:
        problem = emt_unsupported(structures)
        if problem:
            raise ValueError(problem)

    @staticmethod
    def energy_convention(level_of_theory: dict[str, Any]) -> dict[str, Any]:
        """A classical potential: no electrons, no smearing."""
        return convention("total", "ase-emt")

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        problem = emt_unsupported([atoms])
        if problem:
            raise LabelError(problem)
        atoms = atoms.copy()
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=True) if atoms.pbc.all() else None
        check_result(energy, forces, stress)
        return LabelResult(energy=float(energy), forces=forces, stress=stress)

    def convergence_settings(self) -> tuple[ConvergenceSetting, ...]:
        """Nothing to converge: EMT is analytic, with no basis or k-point grid."""
        return ()

    def with_setting(self, name: str, value: float) -> EMTLabeller:
        raise ValueError(f"emt labels have no convergence setting {name!r}")
