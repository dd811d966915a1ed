"""Replay that takes the labels' pressure: the line through the pretrained model's pressure
errors on a seed's strained labels, and the replayed stresses shifted by it.

Replayed copies at +-3 % of a seed's volume carry the pretrained model's pressures; in the
five-system campaign they held LiF's bulk modulus at the pretrained 0.78-0.86 of DFT in every
training although its strained labels said otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from pestle.structures import LabelledStructure
from pestle.trainers.replay import pressure_corrections

SEED = bulk("LiF", "rocksalt", a=4.07, cubic=True)


def strained(volume_factor: float, pressure_gpa: float, tag: str, rattle: float = 0.0,
             stress: bool = True) -> LabelledStructure:  # fmt: skip
    atoms = SEED.copy()
    atoms.set_cell(SEED.cell.array * volume_factor ** (1 / 3), scale_atoms=True)
    if rattle:
        atoms.rattle(rattle, seed=1)
    voigt = np.array([-pressure_gpa] * 3 + [0.0] * 3) * units.GPa  # ASE: tensile positive
    atoms.calc = SinglePointCalculator(atoms, energy=-30.0, forces=np.zeros((len(atoms), 3)),
                                       stress=voigt if stress else None)  # fmt: skip
    return LabelledStructure(atoms, f"s-{tag}", f"l-{tag}")


def model(cells: list[Atoms]) -> list[float]:
    """A model whose pressure is 50 GPa times the compression (bulk modulus 50 GPa)."""
    return [50.0 * (1 - c.get_volume() / SEED.get_volume()) for c in cells]


def test_the_line_through_the_strained_labels_pressure_errors() -> None:
    # Reference modulus 70 GPa and 1 GPa more pressure everywhere: errors 1 - 20 * strain.
    labels = [strained(f, 70.0 * (1 - f) + 1.0, f"v{f}") for f in (0.93, 0.95, 1.05)]
    # A rattled cell at the seed's volume (its pressure is its displacements') and a strained
    # cell without a stress take no part; another system's labels neither.
    labels += [strained(1.0, 30.0, "rattled", rattle=0.2), strained(0.9, 0.0, "none", stress=False)]
    labels += [LabelledStructure(bulk("Cu", "fcc", a=3.4, cubic=True), "cu", "cu")]
    (correction,) = pressure_corrections([SEED], labels, model).values()
    assert correction.applied and correction.origin == "seed F-Li"
    assert correction.offset == pytest.approx(1.0, abs=1e-6)
    assert correction.slope == pytest.approx(-20.0, abs=1e-4)
    assert sorted(correction.strains) == pytest.approx([-0.07, -0.05, 0.05])
    assert correction.at(-0.03) == pytest.approx(1.6) and correction.at(0.03) == pytest.approx(0.4)
    # Beyond the labels (-0.07 .. +0.05) the line is held at its ends, not extrapolated.
    assert correction.at(-0.12) == pytest.approx(2.4) and correction.at(0.08) == pytest.approx(0.0)


def test_labels_on_one_side_of_the_seed_volume_correct_nothing() -> None:
    """LiF's two compressed picks (V/V0 0.93 and 0.95): a line through them sets a modulus
    from two points 2 % apart, so no correction is made, and the reason says why."""
    labels = [strained(f, 70.0 * (1 - f) + 1.0, f"v{f}") for f in (0.928, 0.946)]
    (correction,) = pressure_corrections([SEED], labels, model).values()
    assert not correction.applied and correction.at(0.03) == 0.0
    assert "2 strained label(s), not on both sides" in correction.reason
    (none,) = pressure_corrections([SEED], [], model).values()
    assert not none.applied and "0 strained" in none.reason


def test_two_seeds_of_one_chemical_system_are_not_corrected() -> None:
    other = SEED.copy()
    labels = [strained(f, 70.0 * (1 - f), f"v{f}") for f in (0.93, 1.05)]
    corrections = pressure_corrections([SEED, other], labels, model)
    assert all(
        not c.applied and "several seeds of this chemical system" in c.reason
        for c in corrections.values()
    )


def test_the_option_without_replayed_stresses_is_refused() -> None:
    from pestle.trainers import TRAINERS

    for params in ({"replay_pressure_from_labels": True},
                   {"replay_pressure_from_labels": True, "replay_weight": 0.3,
                    "replay_stress": False}):  # fmt: skip
        with pytest.raises(ValueError, match="needs replay_weight > 0 and replay_stress true"):
            TRAINERS.build("chgnet", params)
    assert TRAINERS.build("chgnet", {"replay_pressure_from_labels": True, "replay_weight": 0.3})
