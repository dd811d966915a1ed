"""Rattle and strain samplers: determinism, provenance, and the physics they promise."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from pydantic import ValidationError

from pestle.samplers import SAMPLERS, Seed
from pestle.samplers.validity import check_structure
from pestle.structures import fingerprint


@pytest.fixture
def si_seed() -> Seed:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    return Seed(atoms=atoms, id=fingerprint(atoms), name="Si")


def test_rattle_is_deterministic_and_records_provenance(si_seed: Seed) -> None:
    sampler = SAMPLERS.build("rattle", {"amplitudes": [0.05, 0.2], "per_amplitude": 40})
    first = sampler.sample(si_seed, rng_seed=11)
    again = sampler.sample(si_seed, rng_seed=11)
    other = sampler.sample(si_seed, rng_seed=12)
    assert len(first) == 80
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.atoms.positions, b.atoms.positions)
        assert a.rng_seed == b.rng_seed
    assert not np.allclose(first[0].atoms.positions, other[0].atoms.positions)
    assert len({c.rng_seed for c in first}) == 80
    assert {c.parent_id for c in first} == {si_seed.id} and first[0].sampler == "rattle"
    # The recorded child seed alone reproduces a structure.
    c = first[45]
    redo = np.random.default_rng(c.rng_seed).normal(0, c.params["amplitude"], size=(8, 3))
    np.testing.assert_allclose(c.atoms.positions, si_seed.atoms.positions + redo)
    # Displacements have the requested standard deviation (1200 draws per amplitude).
    for amplitude in (0.05, 0.2):
        d = np.concatenate(
            [
                c.atoms.positions - si_seed.atoms.positions
                for c in first
                if c.params["amplitude"] == amplitude
            ]
        )
        assert d.std() == pytest.approx(amplitude, rel=0.08)
        assert abs(d.mean()) < 0.2 * amplitude
    np.testing.assert_array_equal(first[0].atoms.cell, si_seed.atoms.cell)


def test_rattle_supercell(si_seed: Seed) -> None:
    sampler = SAMPLERS.build(
        "rattle", {"amplitudes": [0.1], "per_amplitude": 1, "supercell": [2, 1, 1]}
    )
    [candidate] = sampler.sample(si_seed, rng_seed=1)
    assert len(candidate.atoms) == 16 and candidate.params["supercell"] == [2, 1, 1]


def test_strain_tensors_are_symmetric_and_bounded(si_seed: Seed) -> None:
    sampler = SAMPLERS.build("strain", {"max_strain": 0.04, "count": 30})
    candidates = sampler.sample(si_seed, rng_seed=5)
    assert len(candidates) == 30
    base = si_seed.atoms.cell.array
    volumes = []
    for c in candidates:
        strain = np.array(c.params["strain"])
        np.testing.assert_allclose(strain, strain.T, atol=1e-12)
        assert np.abs(np.linalg.eigvalsh(strain)).max() <= 0.04 + 1e-12
        np.testing.assert_allclose(c.atoms.cell.array, base @ (np.eye(3) + strain), atol=1e-8)
        # Fractional coordinates are kept: the strain is homogeneous.
        np.testing.assert_allclose(
            c.atoms.get_scaled_positions(), si_seed.atoms.get_scaled_positions(), atol=1e-8
        )
        volumes.append(c.atoms.get_volume() / si_seed.atoms.get_volume() - 1)
    # Both compressed and expanded cells, and shears (off-diagonal components) occur.
    assert min(volumes) < -0.01 and max(volumes) > 0.01
    assert max(abs(np.array(c.params["strain"])[0, 1]) for c in candidates) > 0.005
    again = sampler.sample(si_seed, rng_seed=5)
    assert [c.params["strain"] for c in again] == [c.params["strain"] for c in candidates]


def test_strain_with_rattle_breaks_symmetry(si_seed: Seed) -> None:
    sampler = SAMPLERS.build("strain", {"max_strain": 0.02, "count": 1, "rattle": 0.05})
    [c] = sampler.sample(si_seed, rng_seed=5)
    strained_only = si_seed.atoms.cell.array @ (np.eye(3) + np.array(c.params["strain"]))
    ideal = si_seed.atoms.get_scaled_positions() @ strained_only
    assert 0.01 < np.abs(c.atoms.positions - ideal).max() < 0.5


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("rattle", {"amplitudes": [-0.1]}, "amplitudes"),
        ("rattle", {"amplitude": 0.1}, "amplitude"),
        ("strain", {"max_strain": 0.9}, "max_strain"),
        ("strain", {"count": 0}, "count"),
    ],
)
def test_bad_params_are_rejected(name: str, params: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        SAMPLERS.build(name, params)


def test_check_structure() -> None:
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    assert check_structure(si) is None
    squashed = si.copy()
    squashed.positions[1] = squashed.positions[0] + [0.3, 0, 0]
    reason = check_structure(squashed)
    assert reason is not None and "0.30 A apart" in reason
    # Closeness across the periodic boundary counts too.
    wrapped = si.copy()
    wrapped.positions[0] = [0.1, 0.1, 0.1]
    wrapped.positions[1] = [5.33, 0.1, 0.1]
    assert "apart" in check_structure(wrapped)
    assert "exceed" in check_structure(si.repeat(4), max_atoms=100)
    nan = si.copy()
    nan.positions[0, 0] = np.nan
    assert check_structure(nan) == "non-finite positions"
    flat = Atoms(
        "Si2", positions=[[0, 0, 0], [1, 1, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True
    )
    assert "degenerate" in check_structure(flat)
