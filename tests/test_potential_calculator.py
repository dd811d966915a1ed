"""A pestle Potential behind ASE's Calculator interface gives the potential's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from pestle.potentials import POTENTIALS
from pestle.potentials.calculator import PotentialCalculator


def test_calculator_reproduces_the_wrapped_model() -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=2)
    reference = atoms.copy()
    reference.calc = EMT()
    atoms.calc = PotentialCalculator(POTENTIALS.build("emt"))
    assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy())
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-12)
    # Moving an atom invalidates the cached results.
    before = atoms.get_potential_energy()
    atoms.positions[0] += 0.05
    assert atoms.get_potential_energy() != before
