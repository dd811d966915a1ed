"""Labellers on real codes: GPAW plane-wave DFT on a two-atom cell, and ASE's EMT."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from pydantic import ValidationError

from pestle.labellers import LABELLERS, LabelError, level_of_theory_hash

FAST_GPAW = {"ecut": 200, "kpoint_density": 1.0}


@pytest.fixture(scope="module")
def rattled_si():
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.fixture(scope="module")
def gpaw_result(rattled_si, tmp_path_factory):
    labeller = LABELLERS.build("gpaw", FAST_GPAW)
    return labeller.label(rattled_si, tmp_path_factory.mktemp("gpaw"))


def test_gpaw_label_is_physical(gpaw_result, rattled_si) -> None:
    r = gpaw_result
    assert np.isfinite(r.energy) and -12 < r.energy / len(rattled_si) < -4  # eV/atom, PBE Si
    assert r.forces.shape == (2, 3) and r.stress.shape == (6,)
    # Newton's third law: two atoms, equal and opposite forces.
    np.testing.assert_allclose(r.forces.sum(axis=0), 0, atol=1e-2)
    assert np.linalg.norm(r.forces[0]) > 0.1  # displaced atoms feel a force
    assert r.extra["kpts"] == [3, 3, 3] and r.extra["scf_iterations"] > 1
    assert set(r.extra["setup_fingerprints"]) == {"Si"}


def test_gpaw_forces_match_finite_differences(rattled_si, gpaw_result, tmp_path) -> None:
    """The stored force is minus the gradient of the stored (free) energy."""
    labeller = LABELLERS.build(
        "gpaw", {**FAST_GPAW, "convergence": {"energy": 1e-8, "density": 1e-7}}
    )
    step = 0.01
    energies = []
    for sign in (1, -1):
        moved = rattled_si.copy()
        moved.positions[0, 0] += sign * step
        energies.append(labeller.label(moved, tmp_path / str(sign)).energy)
    numeric = -(energies[0] - energies[1]) / (2 * step)
    assert numeric == pytest.approx(gpaw_result.forces[0, 0], abs=0.03)


def test_gpaw_level_of_theory_keys_labels() -> None:
    labeller = LABELLERS.build("gpaw", FAST_GPAW)
    lot = labeller.level_of_theory()
    assert lot["code"] == "gpaw" and lot["version"] and lot["xc"] == "PBE" and lot["ecut"] == 200
    assert lot["smearing"] == {"name": "fermi-dirac", "width": 0.05}
    assert lot["setups"]["name"] == "paw" and len(lot["setups"]["sha256"]) == 64
    assert "/" not in str(lot)  # nothing machine-specific in what the hash covers
    same = LABELLERS.build("gpaw", dict(FAST_GPAW))
    assert level_of_theory_hash(same) == level_of_theory_hash(labeller)
    for change in ({"ecut": 250}, {"kpoint_density": 2.0}, {"xc": "LDA"}, {"smearing_width": 0.1}):
        other = LABELLERS.build("gpaw", {**FAST_GPAW, **change})
        assert level_of_theory_hash(other) != level_of_theory_hash(labeller), change
    clone = pickle.loads(pickle.dumps(labeller))
    assert level_of_theory_hash(clone) == level_of_theory_hash(labeller)


def test_gpaw_unconverged_scf_is_an_error(rattled_si, tmp_path) -> None:
    labeller = LABELLERS.build("gpaw", {**FAST_GPAW, "maxiter": 2})
    with pytest.raises(LabelError, match="did not converge"):
        labeller.label(rattled_si, tmp_path)


def test_gpaw_missing_setups_name_the_variable(monkeypatch) -> None:
    import gpaw

    from pestle.labellers.gpaw import setup_dataset

    setup_dataset.cache_clear()
    monkeypatch.setattr(gpaw, "setup_paths", ["/nonexistent"])
    try:
        with pytest.raises(LabelError, match="GPAW_SETUP_PATH"):
            LABELLERS.build("gpaw", {}).level_of_theory()
    finally:
        setup_dataset.cache_clear()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"ecut": -1}, "ecut"),
        ({"cutoff": 300}, "cutoff"),
        ({"smearing": "tetrahedron"}, "smearing"),
    ],
)
def test_gpaw_bad_params(params: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LABELLERS.build("gpaw", params)


def test_emt_matches_ase(tmp_path) -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=3)
    result = LABELLERS.build("emt", {}).label(atoms, tmp_path)
    atoms.calc = EMT()
    assert result.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(result.forces, atoms.get_forces(), atol=1e-12)
    np.testing.assert_allclose(result.stress, atoms.get_stress(), atol=1e-12)
    assert LABELLERS.build("emt", {}).level_of_theory()["code"] == "ase-emt"


def test_emt_refuses_unknown_elements(tmp_path) -> None:
    with pytest.raises(LabelError, match="Si"):
        LABELLERS.build("emt", {}).label(bulk("Si", "diamond", a=5.43), tmp_path)


def test_debian_setups_first_however_pestle_is_launched(monkeypatch) -> None:
    """Without GPAW_SETUP_PATH GPAW would take pip's gpaw-data setups: another dataset, so
    another level of theory. pestle puts Debian's gpaw-data first, as the setup script does."""
    import gpaw

    from pestle.labellers.gpaw import DEBIAN_SETUPS, setup_dataset, setup_search_paths

    assert DEBIAN_SETUPS.is_dir(), "scripts/bootstrap.sh installs Debian's gpaw-data"
    with_variable = level_of_theory_hash(LABELLERS.build("gpaw", FAST_GPAW))
    monkeypatch.delenv("GPAW_SETUP_PATH", raising=False)
    monkeypatch.setattr(
        gpaw, "setup_paths", [p for p in gpaw.setup_paths if str(p) != str(DEBIAN_SETUPS)]
    )
    setup_dataset.cache_clear()
    try:
        assert setup_search_paths()[0] == DEBIAN_SETUPS
        assert level_of_theory_hash(LABELLERS.build("gpaw", FAST_GPAW)) == with_variable
    finally:
        setup_dataset.cache_clear()


def test_potential_labeller_gives_the_models_numbers(tmp_path) -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=5)
    labeller = LABELLERS.build("potential", {"potential": {"name": "emt"}})
    result = labeller.label(atoms, tmp_path)
    reference = LABELLERS.build("emt", {}).label(atoms, tmp_path)
    assert result.energy == pytest.approx(reference.energy)
    np.testing.assert_allclose(result.forces, reference.forces)
    assert labeller.level_of_theory() == {
        "code": "pestle-potential",
        "potential": {
            "family": "emt",
            "ase_version": labeller.level_of_theory()["potential"]["ase_version"],
        },
    }
    clone = pickle.loads(pickle.dumps(labeller))
    assert clone._potential is None  # settings travel, loaded models do not
    assert level_of_theory_hash(clone) == level_of_theory_hash(labeller)
    with pytest.raises(ValidationError):
        LABELLERS.build("potential", {"potential": {"name": "emt", "params": {"bogus": 1}}})


def test_gpaw_under_mpi_gives_the_serial_numbers(rattled_si, gpaw_result, tmp_path) -> None:
    labeller = LABELLERS.build("gpaw", {**FAST_GPAW, "parallel_ranks": 2})
    assert labeller.cpus() == 2
    result = labeller.label(rattled_si, tmp_path)
    assert result.extra["mpi_ranks"] == 2
    assert result.energy == pytest.approx(gpaw_result.energy, abs=1e-6)
    np.testing.assert_allclose(result.forces, gpaw_result.forces, atol=1e-5)
    # Ranks are how it runs, not what it computes: the level of theory is the same.
    assert level_of_theory_hash(labeller) == level_of_theory_hash(
        LABELLERS.build("gpaw", FAST_GPAW)
    )
