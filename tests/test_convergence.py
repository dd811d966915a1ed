"""Convergence gate: ladders, the representative structure, the gate's logic on labellers
with nothing to converge and on an EMT labeller with a known cutoff error, and with GPAW: it
catches 8-atom rattled LiF at 350 eV and passes Si."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase import units
from ase.build import bulk

from pestle.labellers import LABELLERS, ConvergenceSetting, LabelResult
from pestle.labellers.convergence import (
    ConvergenceOptions,
    ConvergenceTolerances,
    check_convergence,
    check_seed,
    representative,
)


@pytest.fixture(scope="module")
def cu():
    return representative(bulk("Cu", "fcc", a=3.61, cubic=True))


def test_ladders_of_the_labellers() -> None:
    gpaw = {s.name: s for s in LABELLERS.build("gpaw", {"ecut": 600}).convergence_settings()}
    assert list(gpaw) == ["ecut", "kpoint_density"]  # cutoff first
    ecut, kd = gpaw["ecut"], gpaw["kpoint_density"]
    assert (ecut.field, ecut.kind, ecut.value) == ("labeller.params.ecut", "basis", 600.0)
    assert [ecut.next_value(v) for v in (350.0, 600.0, 780.0)] == [460.0, 780.0, 1020.0]
    assert [kd.next_value(v) for v in (3.0, 4.5)] == [4.5, 7.0]
    assert ecut.next_value(1900.0) is None  # beyond the ladder's limit
    raised = LABELLERS.build("gpaw", {"ecut": 600}).with_setting("ecut", 780.0)
    assert raised.params.ecut == 780.0 and raised.params.kpoint_density == 3.0
    with pytest.raises(ValueError, match="no convergence setting"):
        raised.with_setting("xc", 1.0)

    vasp = LABELLERS.build("vasp", {})
    names = [s.name for s in vasp.convergence_settings()]
    assert names == ["ENCUT", "reciprocal_density"]
    assert vasp.convergence_settings()[0].value == 520.0
    assert vasp.with_setting("ENCUT", 680.0).level_of_theory()["incar"]["ENCUT"] == 680.0
    scan = LABELLERS.build("vasp", {"input_set": "MPScanStaticSet"})
    spacing = scan.convergence_settings()[1]
    assert spacing.name == "KSPACING" and spacing.next_value(0.22) == 0.14  # denser = smaller
    assert scan.with_setting("KSPACING", 0.14).level_of_theory()["incar"]["KSPACING"] == 0.14


def test_representative_is_deterministic_and_off_equilibrium() -> None:
    seed = bulk("Cu", "fcc", a=3.61, cubic=True)
    one, two = representative(seed), representative(seed)
    np.testing.assert_array_equal(one.structure.positions, two.structure.positions)
    np.testing.assert_array_equal(one.structure.cell.array, two.structure.cell.array)
    other = representative(seed, rng_seed=1)
    assert not np.allclose(other.structure.positions, one.structure.positions)
    np.testing.assert_allclose(one.reference.positions, seed.positions)
    emt = LABELLERS.build("emt", {})
    distorted = emt.label(one.structure, None)
    undistorted = emt.label(one.reference, None)
    assert np.abs(distorted.forces).max() > 0.1  # rattled: forces
    assert np.abs(undistorted.forces).max() < 1e-8
    shear = np.abs(distorted.stress[3:]).max() / units.GPa
    assert shear > 0.1  # randomly oriented strain: shear stress too
    assert distorted.energy > undistorted.energy  # off equilibrium costs energy
    # A one-atom cell is doubled: one atom alone feels no force.
    assert len(representative(bulk("Cu", "fcc", a=3.61)).structure) == 2


@pytest.mark.parametrize(
    "name, params",
    [("emt", {}), ("potential", {"potential": {"name": "emt", "params": {}}})],
)
def test_nothing_to_converge_passes(name, params, cu) -> None:
    labeller = LABELLERS.build(name, params)
    report = check_convergence(labeller, cu.structure, reference=cu.reference)
    assert report.status == "nothing_to_converge" and report.passed
    assert report.converged_quantities == ["energy", "forces", "stress"]
    assert "nothing to check" in report.message
    json.dumps(report.as_dict())  # storable


def test_a_labeller_that_declares_nothing_is_not_vouched_for(cu) -> None:
    class Bare:
        name = "bare"

        def level_of_theory(self):
            return {"code": "bare"}

        def label(self, atoms, workdir):
            raise AssertionError("nothing should be labelled")

    report = check_convergence(Bare(), cu.structure)
    assert report.status == "undeclared" and not report.passed
    assert "convergence_settings()" in report.message


class CutoffErrorEMT:
    """EMT plus a known, cutoff-dependent error shaped like an unconverged basis: energy
    too high by amp * exp(-ecut / 100) eV per Å^3 (so a Pulay-like isotropic stress), forces
    scaled by (1 + that amplitude). ``stress_only`` leaves energy and forces exact."""

    name = "cutoff-error-emt"

    def __init__(self, ecut: float = 300.0, amp: float = 1.0, stress_only: bool = False):
        self.ecut, self.amp, self.stress_only = ecut, amp, stress_only
        self.calls = 0

    def level_of_theory(self):
        return {"ecut": self.ecut, "amp": self.amp, "stress_only": self.stress_only}

    def label(self, atoms, workdir):
        self.calls += 1
        exact = LABELLERS.build("emt", {}).label(atoms, workdir)
        error = self.amp * math.exp(-self.ecut / 100.0)
        pulay = error * np.array([1.0, 1, 1, 0, 0, 0])  # eV/Å^3
        if self.stress_only:
            return LabelResult(exact.energy, exact.forces, exact.stress + pulay)
        return LabelResult(
            exact.energy + error * atoms.get_volume(),
            exact.forces * (1 + error),
            exact.stress + pulay,
        )

    def convergence_settings(self):
        return (ConvergenceSetting("ecut", "labeller.params.ecut", self.ecut, "eV", "basis",
                                   factor=1.3, quantum=10.0, limit=2000.0),)  # fmt: skip

    def with_setting(self, name, value):
        assert name == "ecut"
        return CutoffErrorEMT(value, self.amp, self.stress_only)


def test_gate_fails_names_the_field_and_climbs_with_auto_raise(cu) -> None:
    labels = []

    def counting(labeller, atoms):
        labels.append(labeller.ecut)
        return labeller.label(atoms, None)

    report = check_convergence(
        CutoffErrorEMT(300.0), cu.structure, reference=cu.reference, label_fn=counting
    )
    assert report.status == "not_converged" and not report.passed
    assert report.culprit == "Cu"
    [setting] = report.settings
    assert [c.value for c in setting.calculations] == [300.0, 390.0]
    comparison = setting.comparisons[0]
    # exp(-3) - exp(-3.9) = 0.0296 eV/Å^3 = 4.74 GPa of isotropic stress between the rungs
    assert comparison.checks["stress_max"].difference == pytest.approx(4.74, abs=0.01)
    assert comparison.checks["stress_max"].passed is False
    assert "labeller.params.ecut = 300 eV" in report.message
    assert "to at least 390 eV" in report.message
    assert sorted(labels) == [300.0, 300.0, 390.0, 390.0]  # structure and reference per rung

    labels.clear()
    climbed = check_convergence(
        CutoffErrorEMT(300.0), cu.structure, reference=cu.reference, label_fn=counting,
        auto_raise=True, max_raises=5,
    )  # fmt: skip
    assert climbed.status == "raised" and climbed.passed
    [setting] = climbed.settings
    # error(v) - error(1.3 v) falls below 1 GPa (6.2e-3 eV/Å^3) first at 510 vs 670 eV
    assert [(c.value, c.against, c.passed) for c in setting.comparisons] == [
        (300.0, 390.0, False), (390.0, 510.0, False), (510.0, 670.0, True)
    ]  # fmt: skip
    assert climbed.recommended == {"ecut": 510.0}
    assert climbed.recommended_fields == {"labeller.params.ecut": 510.0}
    assert climbed.recommended_labeller(CutoffErrorEMT(300.0)).ecut == 510.0
    assert "300 eV → 510 eV" in climbed.message
    assert len(labels) == 8  # each rung once per structure, none twice
    stored = json.loads(json.dumps(climbed.as_dict()))  # storable as it is
    assert stored["passed"] and stored["settings"][0]["setting"]["field"] == "labeller.params.ecut"

    capped = check_convergence(
        CutoffErrorEMT(300.0), cu.structure, reference=cu.reference, auto_raise=True,
        max_raises=2,
    )  # fmt: skip
    assert capped.status == "not_converged" and "max_raises" in capped.message
    assert capped.recommended == {"ecut": 510.0}  # the best tested, not vouched for


def test_stress_alone_unconverged_leaves_energy_and_forces_usable(cu) -> None:
    report = check_convergence(
        CutoffErrorEMT(300.0, stress_only=True), cu.structure, reference=cu.reference
    )
    assert report.status == "not_converged"
    assert report.converged_quantities == ["energy", "forces"]
    assert report.unconverged_quantities == ["stress"]
    assert "not converged: stress" in report.message
    loose = check_convergence(
        CutoffErrorEMT(300.0, stress_only=True), cu.structure, reference=cu.reference,
        tolerances={"stress_max": 10.0},
    )  # fmt: skip
    assert loose.status == "converged" and loose.passed
    with pytest.raises(ValueError):
        ConvergenceTolerances(stress_max=-1)


def test_auto_raise_does_not_climb_for_what_may_stay_unconverged(cu) -> None:
    """convergence.leave_out: [stress] with auto-raise: a cutoff whose energy and forces agree
    with the next rung is kept (stress reported unconverged); without leave_out it climbs."""
    stress_only = CutoffErrorEMT(300.0, stress_only=True)
    kept = check_convergence(stress_only, cu.structure, reference=cu.reference,
                             auto_raise=True, may_stay_unconverged=["stress"])  # fmt: skip
    [setting] = kept.settings
    assert [(c.value, c.against) for c in setting.comparisons] == [(300.0, 390.0)]
    assert kept.recommended == {"ecut": 300.0} and kept.recommended_fields == {}
    assert kept.status == "not_converged" and kept.unconverged_quantities == ["stress"]
    assert check_seed_gate_allows(kept)
    climbed = check_convergence(stress_only, cu.structure, reference=cu.reference,
                                auto_raise=True, max_raises=5)  # fmt: skip
    assert climbed.status == "raised" and climbed.recommended == {"ecut": 510.0}
    # Energy and forces wrong too: leave_out does not stop the climb.
    full = check_convergence(CutoffErrorEMT(300.0), cu.structure, reference=cu.reference,
                             auto_raise=True, max_raises=5, may_stay_unconverged=["stress"])  # fmt: skip
    assert full.recommended["ecut"] > 300.0


class CreepingPulayEMT:
    """EMT with a basis error shaped as Francis and Payne describe a plane-wave cutoff's:
    energy too high by ``a`` V / ecut, the stress missing (2/3V) dE/d ln ecut = (2/3) a / ecut
    (eV/Å³), forces exact. Rung to rung the stress creeps by 0.15 a/ecut, far less than its
    distance from the converged value."""

    name = "creeping-pulay-emt"

    def __init__(self, ecut: float = 300.0, a: float = 5.616):
        self.ecut, self.a = ecut, a

    def level_of_theory(self):
        return {"ecut": self.ecut, "a": self.a}

    def label(self, atoms, workdir):
        exact = LABELLERS.build("emt", {}).label(atoms, workdir)
        missing = 2.0 / 3.0 * self.a / self.ecut
        return LabelResult(
            exact.energy + self.a * atoms.get_volume() / self.ecut,
            exact.forces,
            exact.stress + missing * np.array([1.0, 1, 1, 0, 0, 0]),
        )

    def convergence_settings(self):
        return (ConvergenceSetting("ecut", "labeller.params.ecut", self.ecut, "eV", "basis",
                                   factor=1.3, quantum=10.0, limit=2000.0,
                                   plane_wave_cutoff=True),)  # fmt: skip

    def with_setting(self, name, value):
        return CreepingPulayEMT(value, self.a)


def test_a_stress_that_creeps_rung_by_rung_is_caught_by_its_pulay_estimate(cu) -> None:
    """The stress at 300 eV is 2.0 GPa from converged while the next rung's differs by 0.46
    GPa: the rung-to-rung check passes it, the Pulay stress estimated from the energies
    (1.76 GPa) does not, and auto-raise climbs until the estimate is below 1 GPa."""
    labeller = CreepingPulayEMT(300.0)
    report = check_convergence(labeller, cu.structure, reference=cu.reference)
    assert report.status == "not_converged" and report.unconverged_quantities == ["stress"]
    checks = report.settings[0].comparisons[0].checks
    assert checks["stress_max"].passed and checks["stress_max"].difference < 0.5
    true_error = 2.0 / 3.0 * labeller.a / 300.0 / units.GPa
    assert true_error == pytest.approx(2.0, abs=0.01)
    # The finite difference between rungs stands in for the derivative: 0.88 of it here.
    assert checks["pulay_stress"].difference == pytest.approx(0.88 * true_error, rel=0.01)
    assert checks["pulay_stress"].passed is False
    assert "Pulay stress estimated from the energy's change" in report.message

    unchecked = check_convergence(labeller, cu.structure, reference=cu.reference,
                                  tolerances={"pulay_stress": None})  # fmt: skip
    assert unchecked.status == "converged"  # what the gate said before it estimated

    climbed = check_convergence(labeller, cu.structure, reference=cu.reference,
                                auto_raise=True, max_raises=5)  # fmt: skip
    assert climbed.status == "raised"
    pairs = [(c.value, c.checks["pulay_stress"].passed) for c in climbed.settings[0].comparisons]
    assert pairs == [(300.0, False), (390.0, False), (510.0, False), (670.0, True)]
    assert climbed.recommended == {"ecut": 670.0}
    assert "300 eV → 670 eV (agrees with 880 eV; Pulay stress estimated at 0.78 GPa)" in (
        climbed.message
    )

    # The stress's distance to convergence at the rung chosen is within the tolerance.
    assert 2.0 / 3.0 * labeller.a / 670.0 / units.GPa < 1.0
    # A cutoff that is not a plane-wave cutoff is not judged by the estimate.
    other = check_convergence(CutoffErrorEMT(300.0), cu.structure, reference=cu.reference)
    assert "pulay_stress" not in other.settings[0].comparisons[0].checks


def test_the_pulay_estimate_of_lif_at_780_ev() -> None:
    """GPAW PBE, 8-atom LiF at a = 4.07 Å (benchmarks/ notes): E/atom -4.77382 eV at 780 eV
    and -4.80956 eV at 1010 eV; the stress at 780 eV is 1.77 GPa from 1700 eV's."""
    from pestle.labellers.convergence import pulay_stress_estimate

    volume = 8 * 8.427
    estimate = pulay_stress_estimate(8 * -4.77382, 8 * -4.80956, 780.0, 1010.0, volume)
    assert estimate == pytest.approx(1.75, abs=0.01)


def check_seed_gate_allows(report) -> bool:
    from pestle.stages.convergence import gate_allows

    return gate_allows(report.as_dict(), ["stress"]) and not gate_allows(report.as_dict(), [])


def test_gpaw_basis_error_blames_fluorine_not_lithium() -> None:
    """The estimate behind the culprit: F's setup is far harder than Li's or Si's."""
    errors = LABELLERS.build("gpaw", {}).basis_error(["Li", "F", "Si"], 350.0)
    assert errors["F"] > 1.0 > 0.01 > max(errors["Li"], errors["Si"])  # eV per atom
    assert LABELLERS.build("gpaw", {}).basis_error(["F"], 800.0)["F"] < errors["F"] / 5


GPAW_CHEAP = {"kpoint_density": 1.0, "spinpol": False, "txt": False}


@pytest.mark.slow
def test_gpaw_gate_catches_lif_at_350_ev(tmp_path) -> None:
    """8-atom rattled, strained LiF at 350 eV against 460 eV (k-point density 1, a 2x2x2
    mesh, is enough to show a cutoff failure in an insulator; ~20 s on one core)."""
    rep = representative(bulk("LiF", "rocksalt", a=4.07, cubic=True))
    labeller = LABELLERS.build("gpaw", {"ecut": 350, **GPAW_CHEAP})
    report = check_convergence(
        labeller, rep.structure, reference=rep.reference, workdir=tmp_path, settings=["ecut"]
    )
    assert report.status == "not_converged" and not report.passed
    assert report.culprit == "F"
    checks = report.settings[0].comparisons[0].checks
    assert checks["stress_max"].difference > 50  # GPa: Pulay stress
    assert checks["energy"].passed is False and checks["stress_max"].passed is False
    assert checks["absolute_energy"].difference > 0.5  # eV/atom
    assert "stress" in report.unconverged_quantities and "energy" in report.unconverged_quantities
    message = report.message
    for words in ("F-Li", "Most likely at fault: F", "labeller.params.ecut = 350 eV",
                  "to at least 460 eV", "largest stress component", "energy relative"):  # fmt: skip
        assert words in message, (words, message)
    print(message)


@pytest.mark.slow
def test_gpaw_gate_passes_silicon(tmp_path) -> None:
    """Two-atom Si at 400 vs 520 eV: silicon's setup is soft, the labels agree."""
    rep = representative(bulk("Si", "diamond", a=5.47))
    labeller = LABELLERS.build("gpaw", {"ecut": 400, **GPAW_CHEAP})
    report = check_convergence(
        labeller, rep.structure, reference=rep.reference, workdir=tmp_path, settings=["ecut"]
    )
    assert report.status == "converged" and report.passed, report.message
    assert report.converged_quantities == ["energy", "forces", "stress"]
    assert report.recommended == {"ecut": 400.0} and report.culprit is None
    assert "converged at labeller.params.ecut = 400 eV (vs 520 eV; Pulay stress" in report.message
    assert report.settings[0].comparisons[0].checks["pulay_stress"].difference < 0.1  # GPa


def test_a_failed_calculation_names_the_rung(cu) -> None:
    from pestle.labellers import LabelError

    def failing_above_350(labeller, atoms):
        if labeller.ecut > 350:
            raise LabelError("SCF did not converge")
        return labeller.label(atoms, None)

    with pytest.raises(LabelError, match=r"convergence check of Cu, structure at ecut = 390"):
        check_convergence(CutoffErrorEMT(300.0), cu.structure, label_fn=failing_above_350)


def test_a_setting_at_the_top_of_its_ladder_is_taken_as_converged(cu) -> None:
    report = check_convergence(CutoffErrorEMT(1990.0), cu.structure)
    assert report.status == "converged" and report.recommended == {"ecut": 1990.0}
    assert report.settings[0].comparisons == [] and "ladder ends" in report.settings[0].ceiling


def test_check_seed_takes_the_campaign_options() -> None:
    seed = bulk("Cu", "fcc", a=3.61, cubic=True)
    options = {"auto_raise": True, "max_raises": 5, "tolerances": {"stress_max": 0.5}}
    report = check_seed(CutoffErrorEMT(300.0), seed, options)
    assert report.status == "raised" and report.energy_measure == "relative"
    assert report.tolerances["stress_max"] == 0.5
    # error(v) - error(1.3 v) below 0.5 GPa (3.1e-3 eV/Å^3) first at 670 vs 880 eV
    assert report.recommended == {"ecut": 670.0}
    with pytest.raises(ValueError):
        ConvergenceOptions(max_raises=0)
