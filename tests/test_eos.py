"""Equation of state: the Birch-Murnaghan fit recovers a known curve, its interval covers the
truth at its nominal rate, failures are named, and EMT's and CHGNet's scans of Cu and Al give
the bulk moduli ASE's own fit gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.eos import EquationOfState

from pestle.evaluation.eos import (
    birch_murnaghan,
    compare_eos,
    eos_structures,
    fit_birch_murnaghan,
    labelled_scan,
    potential_scan,
    stress_consistency,
)
from pestle.potentials import POTENTIALS

TRUE = {"e0": -3.7, "v0": 11.8, "b0": 140.0, "b0_prime": 4.6}  # Cu-like, per atom


def curve(volumes):
    return birch_murnaghan(
        volumes, TRUE["e0"], TRUE["v0"], TRUE["b0"] * units.GPa, TRUE["b0_prime"]
    )


def test_recovers_a_known_curve_exactly() -> None:
    volumes = TRUE["v0"] * np.linspace(0.92, 1.08, 7)
    fit = fit_birch_murnaghan(volumes, curve(volumes))
    assert fit.ok and fit.n_points == 7 and fit.dof == 3
    assert fit.b0 == pytest.approx(140.0, rel=1e-6)
    assert fit.v0 == pytest.approx(11.8, rel=1e-8)
    assert fit.b0_prime == pytest.approx(4.6, rel=1e-4)
    assert fit.e0 == pytest.approx(-3.7, abs=1e-9)
    assert fit.rms_residual < 1e-9


def test_interval_covers_the_truth_at_its_nominal_rate() -> None:
    """Noise of 0.5 meV/atom on 7 points: the t interval from the fit covariance holds the
    true B0 in about 95 % of 300 scans."""
    rng = np.random.default_rng(7)
    volumes = TRUE["v0"] * np.linspace(0.92, 1.08, 7)
    exact = curve(volumes)
    covered, widths = 0, []
    for _ in range(300):
        fit = fit_birch_murnaghan(volumes, exact + rng.normal(0, 5e-4, size=7))
        low, high = fit.b0_interval
        covered += low <= TRUE["b0"] <= high
        widths.append(high - low)
    print(f"coverage {covered / 300:.3f}, median width {np.median(widths):.1f} GPa")
    assert 0.90 <= covered / 300 <= 0.99
    assert 1 < np.median(widths) < 20  # informative, not vacuous


def test_failures_are_named() -> None:
    volumes = TRUE["v0"] * np.linspace(0.92, 1.08, 7)
    few = fit_birch_murnaghan(volumes[:4], curve(volumes[:4]))
    assert few.status == "too_few_points" and "not enough points: 4" in few.message
    nan = curve(volumes)
    nan[[1, 3, 5]] = np.nan  # failed calculations drop out and count against the minimum
    assert fit_birch_murnaghan(volumes, nan).status == "too_few_points"
    upside_down = fit_birch_murnaghan(volumes, -curve(volumes))
    assert upside_down.status == "fit_failed" and "no minimum" in upside_down.message
    shifted = TRUE["v0"] * np.linspace(1.05, 1.25, 7)  # the minimum is below the scan
    outside = fit_birch_murnaghan(shifted, curve(shifted))
    assert outside.status == "minimum_outside_scan" and not outside.ok
    good = fit_birch_murnaghan(volumes, curve(volumes))
    assert compare_eos(outside, good).status == "model_failed"
    assert compare_eos(good, few).status == "reference_failed"
    assert "not enough points" in compare_eos(good, few).message


def test_scan_structures_are_deterministic_isotropic_scalings() -> None:
    seed = bulk("Cu", "fcc", a=3.61, cubic=True)
    seed.rattle(0.02, seed=0)
    scan = eos_structures(seed, volume_range=0.06, points=5)
    ratios = [a.get_volume() / seed.get_volume() for a in scan]
    np.testing.assert_allclose(ratios, [0.94, 0.97, 1.0, 1.03, 1.06])
    for atoms in scan:
        np.testing.assert_allclose(atoms.get_scaled_positions(), seed.get_scaled_positions())
        np.testing.assert_allclose(atoms.cell.angles(), seed.cell.angles())
    again = eos_structures(seed, volume_range=0.06, points=5)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(scan, again, strict=True))


@pytest.mark.parametrize("symbol, a, low, high", [("Cu", 3.6, 100, 180), ("Al", 4.05, 30, 90)])
def test_emt_scan_gives_ase_bulk_modulus(symbol, a, low, high) -> None:
    scan = eos_structures(bulk(symbol, "fcc", a=a, cubic=True))
    emt = POTENTIALS.build("emt", {})
    fit = potential_scan(emt, scan)
    assert fit.ok, fit.message
    energies = [p.energy for p in emt.predict(scan, stress=False)]
    v0, _, b = EquationOfState([x.get_volume() for x in scan], energies, eos="birchmurnaghan").fit()
    assert fit.b0 == pytest.approx(b / units.GPa, rel=1e-4)
    assert fit.v0 == pytest.approx(v0 / len(scan[0]), rel=1e-6)
    assert low < fit.b0 < high  # a plausible metal
    assert fit.b0_interval[0] < fit.b0 < fit.b0_interval[1]

    # The same scan as stored reference labels (energies in a SinglePointCalculator).
    labelled = []
    for atoms, energy in zip(scan, energies, strict=True):
        atoms = atoms.copy()
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
        labelled.append(atoms)
    reference = labelled_scan(labelled)
    same = compare_eos(fit, reference)
    assert same.ok and same.b0_ratio == pytest.approx(1.0, abs=1e-9)
    assert same.b0_ratio_interval[0] <= 1.0 <= same.b0_ratio_interval[1]
    assert abs(same.v0_difference_percent) < 1e-6
    assert json.loads(json.dumps(same.as_dict()))["model"]["status"] == "ok"  # storable


def test_a_scan_whose_stresses_disagree_with_its_energies_is_flagged() -> None:
    """EMT's stress is exactly -dE/dV: the scan is consistent. A constant pressure offset
    on the same scan's stresses (what an under-converged plane-wave basis gives: a Pulay
    stress) moves the pressures' V0 and B0 away from the energies' and is flagged, with the
    pressure left at the energies' minimum."""
    from ase.calculators.emt import EMT

    scan = eos_structures(bulk("Cu", "fcc", a=3.6, cubic=True), points=7)
    labelled, offset = [], []
    for atoms in scan:
        atoms.calc = EMT()
        energy, stress = atoms.get_potential_energy(), atoms.get_stress()
        clean = atoms.copy()
        clean.calc = SinglePointCalculator(clean, energy=energy, stress=stress)
        labelled.append(clean)
        shifted = atoms.copy()
        pulay = np.array([1, 1, 1, 0, 0, 0]) * 3.0 * units.GPa  # tensile +: P lower by 3 GPa
        shifted.calc = SinglePointCalculator(shifted, energy=energy, stress=stress + pulay)
        offset.append(shifted)
    reference = labelled_scan(labelled)
    same = stress_consistency(labelled, reference)
    assert same["consistent"] is True and same["b0_ratio"] == pytest.approx(1.0, abs=0.01)
    assert abs(same["pressure_at_energy_v0"]) < 0.1
    off = stress_consistency(offset, reference, tolerance=0.05)
    assert off["consistent"] is False, off
    assert off["pressure_at_energy_v0"] == pytest.approx(-3.0, abs=0.1)
    assert off["v0_difference_percent"] < -0.5 and off["b0_ratio"] > 1.05
    low, high = off["b0_ratio_interval"]
    assert low < off["b0_ratio"] < high and low > 1.0  # a smooth scan: a narrow interval
    assert "Pulay" in off["message"] and "disagree" in off["message"]
    # No stresses, nothing to compare: not flagged either way.
    bare = [a.copy() for a in scan]
    for atoms, energy_of in zip(bare, labelled, strict=True):
        atoms.calc = SinglePointCalculator(atoms, energy=energy_of.get_potential_energy())
    assert stress_consistency(bare, reference)["consistent"] is None


@pytest.mark.slow
def test_chgnet_scan_of_cu_against_emt_and_ase() -> None:
    """Pretrained CHGNet on Cu: its own fit agrees with ASE's, B0 is a plausible copper
    (PBE ~140 GPa), and the comparison against EMT reports a ratio with an interval."""
    chgnet = POTENTIALS.build("chgnet", {"device": "cpu"})
    scan = eos_structures(bulk("Cu", "fcc", a=3.63, cubic=True))
    fit = potential_scan(chgnet, scan)
    assert fit.ok, fit.message
    energies = [p.energy for p in chgnet.predict(scan, stress=False)]
    _, _, b = EquationOfState([x.get_volume() for x in scan], energies, "birchmurnaghan").fit()
    assert fit.b0 == pytest.approx(b / units.GPa, rel=1e-3)
    assert 90 < fit.b0 < 200
    against_emt = compare_eos(fit, potential_scan(POTENTIALS.build("emt", {}), scan))
    assert against_emt.ok
    low, high = against_emt.b0_ratio_interval
    assert low < against_emt.b0_ratio < high
    print(against_emt.message)
