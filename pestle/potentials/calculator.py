"""Any pestle Potential as an ASE calculator, for samplers that drive dynamics or relaxations
(MD, NEB, Boltzmann-weighted rattling) with the model being improved."""

from __future__ import annotations

from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from pestle.potentials import Potential


class PotentialCalculator(Calculator):
    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, potential: Potential, **kwargs) -> None:
        super().__init__(**kwargs)
        self.potential = potential

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        [prediction] = self.potential.predict([self.atoms])
        self.results = {
            "energy": prediction.energy,
            "free_energy": prediction.energy,
            "forces": prediction.forces,
        }
        if prediction.stress is not None:
            self.results["stress"] = prediction.stress
