"""The CHGNet adapter against chgnet's own ASE calculator, with real pretrained weights."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pestle.potentials import POTENTIALS
from pestle.potentials.checkpoints import ChecksumError, sha256_file
from pestle.potentials.chgnet import CHGNetPotential, pack_by_atom_count, save_checkpoint


@pytest.fixture(scope="module")
def potential() -> CHGNetPotential:
    pot = POTENTIALS.build("chgnet", {"device": "cpu"})
    pot.load_model()
    return pot


def distorted_lif() -> Atoms:
    """8-atom LiF with a sheared cell and rattled atoms: no symmetry hides a wrong index,
    sign or shear component."""
    atoms = bulk("LiF", "rocksalt", a=4.03, cubic=True)
    strain = np.array([[0.01, 0.02, -0.01], [0.0, -0.015, 0.012], [0.005, 0.0, 0.02]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(0.08, seed=1)
    return atoms


def mixed_sizes() -> list[Atoms]:
    si8 = bulk("Si", "diamond", a=5.43, cubic=True)
    si8.rattle(0.05, seed=2)
    si4 = bulk("Si", "diamond", a=5.40).repeat((2, 1, 1))
    si4.rattle(0.05, seed=3)
    lif2 = bulk("LiF", "rocksalt", a=4.0)
    lif2.rattle(0.03, seed=4)
    return [si8, lif2, distorted_lif(), si4]


def test_matches_chgnet_calculator(potential: CHGNetPotential) -> None:
    from chgnet.model.dynamics import CHGNetCalculator

    atoms = distorted_lif()
    pred = potential.predict([atoms])[0]
    atoms.calc = CHGNetCalculator(model=potential.load_model(), use_device="cpu")

    assert pred.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(pred.forces, atoms.get_forces(), atol=1e-6)
    assert pred.stress.shape == (6,)
    np.testing.assert_allclose(pred.stress, atoms.get_stress(voigt=True), atol=1e-8)
    assert np.abs(pred.forces).max() > 0.1  # the cell is really off equilibrium
    assert np.abs(pred.stress[3:]).max() > 1e-4  # and sheared


def test_stress_is_the_ase_strain_derivative(potential: CHGNetPotential) -> None:
    """Independent of chgnet's calculator: sigma_ij = (1/V) dE/d(eps_ij), ASE's convention
    (positive = tensile)."""
    atoms = distorted_lif()
    stress = potential.predict([atoms])[0].stress
    eps = 2e-3
    for voigt, (i, j) in [(0, (0, 0)), (2, (2, 2)), (5, (0, 1))]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * eps / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(potential.predict([strained])[0].energy)
        numeric = (energies[0] - energies[1]) / (2 * eps) / atoms.get_volume()
        assert stress[voigt] == pytest.approx(numeric, rel=0.05, abs=2e-4)


def test_batched_equals_one_by_one(potential: CHGNetPotential) -> None:
    structures = mixed_sizes()
    together = potential.predict(structures)
    alone = [potential.predict([atoms])[0] for atoms in structures]
    assert len(together) == len(structures)
    for atoms, a, b in zip(structures, together, alone, strict=True):
        assert a.forces.shape == (len(atoms), 3)
        assert a.energy == pytest.approx(b.energy, abs=1e-4)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
        # float32 sums in another order per batch: ~1e-7 eV/A^3 (0.02 MPa) apart.
        np.testing.assert_allclose(a.stress, b.stress, atol=1e-6)


def test_cap_smaller_than_a_structure(potential: CHGNetPotential) -> None:
    structures = mixed_sizes()  # 8, 2, 8, 4 atoms
    capped = CHGNetPotential(CHGNetPotential.Params(device="cpu", max_atoms_per_batch=3))
    capped._model = potential.load_model()  # same weights, no second load
    small = capped.predict(structures)
    large = potential.predict(structures)
    for a, b in zip(small, large, strict=True):
        assert a.energy == pytest.approx(b.energy, abs=1e-4)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)


def test_pack_by_atom_count() -> None:
    assert pack_by_atom_count([8, 2, 8, 4], 3) == [[0], [1], [2], [3]]
    assert pack_by_atom_count([8, 2, 8, 4], 10) == [[0, 1], [2], [3]]
    assert pack_by_atom_count([2, 2, 2], 128) == [[0, 1, 2]]
    assert pack_by_atom_count([], 5) == []


def test_checkpoint_round_trip_and_checksum(potential: CHGNetPotential, tmp_path: Path) -> None:
    path = save_checkpoint(potential.load_model(), tmp_path / "copy.pth.tar", {"note": "test"})
    digest = sha256_file(path)

    wrong = POTENTIALS.build(
        "chgnet", {"checkpoint": str(path), "checkpoint_sha256": "0" * 64, "device": "cpu"}
    )
    with pytest.raises(ChecksumError, match=str(path)):
        wrong.predict([distorted_lif()])

    loaded = POTENTIALS.build(
        "chgnet", {"checkpoint": str(path), "checkpoint_sha256": digest, "device": "cpu"}
    )
    atoms = distorted_lif()
    a, b = loaded.predict([atoms])[0], potential.predict([atoms])[0]
    assert a.energy == b.energy
    np.testing.assert_array_equal(a.forces, b.forces)
    described = loaded.describe()
    assert described["family"] == "chgnet"
    assert described["checkpoint"] == str(path)
    assert described["checkpoint_sha256"] == digest
    assert described["model"] is None


def test_pickles_without_weights(potential: CHGNetPotential) -> None:
    blob = pickle.dumps(potential)
    assert len(blob) < 10_000  # settings only; the weights are ~1.6 MB
    clone = pickle.loads(blob)
    assert clone._model is None
    assert clone.describe() == potential.describe()
    assert potential.describe()["model"] == "0.3.0"
    assert potential.describe()["chgnet_version"]


def test_pick_device(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from pestle.devices import pick_device

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with caplog.at_level("WARNING", logger="pestle.devices"):
            assert pick_device("cuda:1") == "cpu"
        assert "CUDA is not available" in caplog.text


def test_without_stress_same_energy_and_forces(potential: CHGNetPotential) -> None:
    structures = mixed_sizes()
    full = potential.predict(structures)
    lean = potential.predict(structures, stress=False)
    for a, b in zip(full, lean, strict=True):
        assert b.stress is None
        assert a.energy == pytest.approx(b.energy, abs=1e-5)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
