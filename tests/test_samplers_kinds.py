"""Surface, defect, solid-solution, phonon, MD, migration, Boltzmann-rattle and strain-mode
samplers: each checked on the physics it promises. Dynamics use ASE's EMT (exact forces,
instant) through the same Potential interface CHGNet is used through."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from pydantic import ValidationError

from pestle.samplers import SAMPLERS, Seed
from pestle.samplers.validity import check_structure
from pestle.structures import fingerprint

EMT_POTENTIAL = {"name": "emt"}


def seed_of(atoms) -> Seed:
    return Seed(atoms=atoms, id=fingerprint(atoms), name=atoms.get_chemical_formula())


@pytest.fixture(scope="module")
def lif() -> Seed:
    return seed_of(bulk("LiF", "rocksalt", a=4.03, cubic=True))


@pytest.fixture(scope="module")
def cu() -> Seed:
    return seed_of(bulk("Cu", "fcc", a=3.61, cubic=True))


def sample(name: str, params: dict, seed: Seed, rng_seed: int = 1):
    candidates = SAMPLERS.build(name, params).sample(seed, rng_seed)
    for c in candidates:
        assert check_structure(c.atoms) is None, (name, c.params)
        assert c.sampler == name and c.parent_id == seed.id
    return candidates


def layer_spacing(positions: np.ndarray, normal: np.ndarray) -> float:
    """Smallest distance between distinct atomic layers along ``normal``."""
    heights = np.sort(positions @ (normal / np.linalg.norm(normal)))
    gaps = np.diff(heights)
    return float(gaps[gaps > 0.05].min())


# -- surface ---------------------------------------------------------------------------------
@pytest.mark.parametrize("crystal", ["LiF", "Cu"])
def test_slabs_have_the_requested_plane_and_vacuum(crystal, lif, cu) -> None:
    seed = {"LiF": lif, "Cu": cu}[crystal]
    params = {"max_index": 1, "min_slab_size": 5.0, "min_vacuum_size": 10.0, "max_atoms": 80}
    slabs = sample("surface", params, seed)
    assert {tuple(c.params["miller_index"]) for c in slabs} == {(1, 0, 0), (1, 1, 0), (1, 1, 1)}
    a = seed.atoms.cell.lengths()[0]  # cubic conventional cell
    for c in slabs:
        atoms = c.atoms
        normal = np.cross(atoms.cell[0], atoms.cell[1])
        miller = np.array(c.params["miller_index"], dtype=float)
        # The slab is rotated into its own frame, so compare a frame-free property: the
        # spacing of atomic layers along the surface normal equals the bulk crystal's spacing
        # along [hkl] (cubic cell), and those differ between (100), (110) and (111).
        expected = layer_spacing(seed.atoms.repeat(3).positions, miller)
        assert layer_spacing(atoms.positions, normal) == pytest.approx(expected, abs=0.02)
        # Vacuum: the empty stretch of c between the slab's top and its periodic image.
        z = atoms.get_scaled_positions()[:, 2] * atoms.cell.lengths()[2]
        gap = atoms.cell.lengths()[2] - (z.max() - z.min())
        assert gap >= 10.0 - 1e-6 and c.params["vacuum"] == pytest.approx(gap, abs=1e-3)
        # The slab holds at least min_slab_size of material, measured in interplanar spacings.
        d_hkl = a / np.linalg.norm(miller)
        assert (z.max() - z.min()) + d_hkl >= 5.0 - 1e-6
        assert atoms.pbc.all()
        if crystal == "LiF":
            symbols = atoms.get_chemical_symbols()
            assert symbols.count("Li") == symbols.count("F")  # stoichiometric slabs
    again = sample("surface", params, seed)
    assert [fingerprint(c.atoms) for c in again] == [fingerprint(c.atoms) for c in slabs]
    few = sample("surface", {**params, "max_atoms": 10}, seed)
    assert all(len(c.atoms) <= 10 for c in few) and len(few) < len(slabs)


# -- defects ---------------------------------------------------------------------------------
def test_vacancy_in_a_covalent_crystal() -> None:
    si = seed_of(bulk("Si", "diamond", a=5.43, cubic=True))
    [vacancy] = sample(
        "defect", {"kinds": ["vacancy"], "rattle": 0.0, "min_supercell_length": 10}, si
    )
    supercell = si.atoms.repeat(vacancy.params["supercell"])
    assert min(supercell.cell.lengths()) >= 10
    assert len(vacancy.atoms) == len(supercell) - 1  # diamond: one symmetry-distinct site
    site = vacancy.params["removed_indices"][0]
    np.testing.assert_allclose(vacancy.atoms.positions, np.delete(supercell.positions, site, 0))


def test_ionic_defects_stay_neutral(lif) -> None:
    params = {"kinds": ["vacancy", "substitution", "interstitial"],
              "substitutions": {"Li": ["Na", "Mg"], "F": ["Cl"]}, "rattle": 0.0}  # fmt: skip
    made = sample("defect", params, lif)
    kinds = sorted(c.params["defect"] for c in made)
    # One Schottky pair type, isovalent Li->Na and F->Cl (Mg2+ refused), one Frenkel pair.
    assert kinds == ["frenkel", "schottky", "substitution", "substitution"]
    charge = {"Li": 1, "Na": 1, "F": -1, "Cl": -1}
    for c in made:
        assert sum(charge[s] for s in c.atoms.get_chemical_symbols()) == 0, c.params
    schottky = next(c for c in made if c.params["defect"] == "schottky")
    assert sorted(schottky.params["removed"]) == ["F", "Li"]
    i, j = schottky.params["removed_indices"]
    host = lif.atoms.repeat(schottky.params["supercell"])
    assert host.get_distance(i, j, mic=True) == pytest.approx(4.03 / 2)  # nearest pair


# -- solid solutions ---------------------------------------------------------------------------
def test_solid_solution_fractions_and_reproducibility(lif) -> None:
    params = {"host": "Li", "substituent": "Na", "fractions": [0.25, 0.4], "per_fraction": 3}
    made = sample("solid_solution", params, lif)
    n_sites = 32  # Li sites in the 2x2x2 supercell
    for c in made:
        achieved = c.atoms.get_chemical_symbols().count("Na") / n_sites
        assert abs(achieved - c.params["requested_fraction"]) <= 0.5 / n_sites
        assert achieved == c.params["fraction"]
        assert c.atoms.get_chemical_symbols().count("F") == 32  # the other sublattice is kept
    assert len({fingerprint(c.atoms) for c in made}) == 6
    again = sample("solid_solution", params, lif)
    assert [fingerprint(c.atoms) for c in again] == [fingerprint(c.atoms) for c in made]
    with pytest.raises(ValueError, match="aliovalent"):
        sample("solid_solution", {"host": "Li", "substituent": "Mg"}, lif)
    with pytest.raises(ValueError, match="host 'Cu'"):
        sample("solid_solution", {"host": "Cu", "substituent": "Ag"}, lif)


# -- phonons ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Si", "LiF"])
def test_phonon_displacements_match_phonopy(name) -> None:
    from phonopy import Phonopy

    from pestle.samplers.phonon import to_phonopy

    atoms = bulk("Si", "diamond", a=5.43) if name == "Si" else bulk("LiF", "rocksalt", a=4.03)
    seed = seed_of(atoms)
    made = sample("phonon", {"supercell": [2, 2, 2], "amplitude": 0.05}, seed)
    reference = Phonopy(to_phonopy(atoms), supercell_matrix=np.diag([2, 2, 2]))
    reference.generate_displacements(distance=0.05)
    assert len(made) == len(reference.supercells_with_displacements)
    ideal = reference.supercell.positions
    for c in made:
        moved = np.linalg.norm(c.atoms.positions - ideal, axis=1)
        assert np.count_nonzero(moved > 1e-8) == 1
        assert moved[c.params["atom"]] == pytest.approx(0.05)


# -- molecular dynamics --------------------------------------------------------------------
def test_nve_conserves_energy(cu) -> None:
    params = {"potential": EMT_POTENTIAL, "thermostat": "nve", "temperatures": [600],
              "equilibration_steps": 0, "snapshot_every": 25, "snapshots_per_temperature": 8,
              "supercell": [2, 2, 2], "timestep_fs": 1.0}  # fmt: skip
    frames = sample("md", params, cu)
    totals = np.array([f.params["total_energy_eV"] for f in frames])
    n = len(frames[0].atoms)
    # Stated tolerance: the total energy drifts < 1 meV/atom over 200 fs at 1 fs steps.
    assert np.ptp(totals) / n < 1e-3
    # The recorded potential energy is EMT's for the stored positions.
    check = frames[-1].atoms.copy()
    check.calc = EMT()
    assert check.get_potential_energy() == pytest.approx(frames[-1].params["potential_energy_eV"])


def test_langevin_reaches_its_temperatures(cu) -> None:
    params = {"potential": EMT_POTENTIAL, "temperatures": [300, 1200], "equilibration_steps": 100,
              "snapshot_every": 10, "snapshots_per_temperature": 10, "supercell": [2, 2, 2],
              "friction_per_fs": 0.05}  # fmt: skip
    frames = sample("md", params, cu)
    ideal = cu.atoms.repeat((2, 2, 2)).positions
    for target in (300, 1200):
        mine = [f for f in frames if f.params["temperature_K"] == target]
        mean = np.mean([f.params["kinetic_temperature_K"] for f in mine])
        assert mean == pytest.approx(target, rel=0.3)
    spread = {
        t: np.mean([np.abs(f.atoms.positions - ideal).mean() for f in frames
                    if f.params["temperature_K"] == t])
        for t in (300, 1200)
    }  # fmt: skip
    assert spread[1200] > spread[300]
    again = sample("md", params, cu)
    np.testing.assert_allclose(again[3].atoms.positions, frames[3].atoms.positions)


# -- migration -----------------------------------------------------------------------------
def test_vacancy_hop_endpoints_and_images(cu) -> None:
    params = {"species": "Cu", "potential": EMT_POTENTIAL, "n_images": 3, "interpolation": "idpp"}
    images = sample("migration", params, cu)
    assert len({c.params["path_id"] for c in images}) == 1  # fcc: one distinct nearest hop
    assert [c.params["image_index"] for c in images] == list(range(5))
    host = cu.atoms.repeat(images[0].params["supercell"])
    site, neighbour = (int(x) for x in images[0].params["path_id"].split("-")[2:4])
    moving = images[0].params["moving_atom"]

    def occupied_sites(atoms):
        """Which host sites hold an atom (periodic nearest site of each atom)."""
        from ase.geometry import get_distances

        _, dist = get_distances(atoms.positions, host.positions, cell=host.cell, pbc=True)
        return set(np.argmin(dist, axis=1).tolist())

    everything = set(range(len(host)))
    assert occupied_sites(images[0].atoms) == everything - {site}
    assert occupied_sites(images[-1].atoms) == everything - {neighbour}
    # The moving ion travels monotonically from its site towards the vacancy.
    target = host.positions[site]
    distances = [np.linalg.norm(c.atoms.positions[moving] - target) for c in images]
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False))
    assert distances[-1] == pytest.approx(0, abs=1e-6)
    unrelaxed = images[0].params["predicted_barrier_eV"]
    relaxed = sample("migration", {**params, "relax": True}, cu)[0].params["predicted_barrier_eV"]
    # EMT's Cu vacancy migration barrier (~0.7 eV); relaxing can only lower the path's top.
    assert 0.4 < relaxed < 1.1 and relaxed < unrelaxed


def test_li_vacancy_hop_in_lif(lif) -> None:
    params = {"species": "Li", "predict_barrier": False, "n_images": 3}
    images = sample("migration", params, lif)
    assert all(c.params["hop_distance"] == pytest.approx(4.03 / 2**0.5) for c in images)
    assert images[0].params["predicted_barrier_eV"] is None
    with pytest.raises(ValueError, match="species 'Na'"):
        sample("migration", {"species": "Na", "predict_barrier": False}, lif)


# -- Boltzmann rattling and strain modes ----------------------------------------------------
def test_boltzmann_acceptance_follows_the_energy(cu) -> None:
    base = {"mode": "boltzmann", "potential": EMT_POTENTIAL, "amplitudes": [0.1],
            "per_amplitude": 6, "max_trials": 15}  # fmt: skip
    assert sample("rattle", {**base, "temperature": 1.0}, cu) == []  # nothing uphill at 1 K
    hot = sample("rattle", {**base, "temperature": 1e5}, cu)
    assert len(hot) == 6
    reference = cu.atoms.copy()
    reference.calc = EMT()
    e0 = reference.get_potential_energy()
    for c in hot:
        atoms = c.atoms.copy()
        atoms.calc = EMT()
        delta = atoms.get_potential_energy() - e0
        assert c.params["energy_change_eV"] == pytest.approx(delta)
        expected = min(1.0, np.exp(-delta / (units.kB * 1e5)))
        assert c.params["acceptance_probability"] == pytest.approx(expected)
    with pytest.raises(ValidationError, match="mode boltzmann needs temperature and potential"):
        SAMPLERS.build("rattle", {"mode": "boltzmann"})


def test_strain_volume_scan_and_shears(cu) -> None:
    scan = sample("strain", {"mode": "volume", "count": 5, "max_strain": 0.04}, cu)
    v0 = cu.atoms.get_volume()
    expected = np.linspace(-0.04, 0.04, 5)
    np.testing.assert_allclose([c.atoms.get_volume() / v0 for c in scan], (1 + expected) ** 3)
    shears = sample("strain", {"mode": "shear", "count": 6, "max_strain": 0.03}, cu)
    for c in shears:
        tensor = np.array(c.params["strain"])
        assert np.trace(tensor) == 0 and np.allclose(tensor, tensor.T)
        assert 0 < np.abs(tensor).max() <= 0.03
        # Volume is conserved to first order: the change is second order in the shear.
        assert abs(c.atoms.get_volume() / v0 - 1) <= np.abs(tensor).max() ** 2 + 1e-12
    assert {tuple(np.argwhere(np.array(c.params["strain"]))[0]) for c in shears} == {
        (0, 1),
        (0, 2),
        (1, 2),
    }


def test_interstitial_hop_between_largest_voids(cu, lif) -> None:
    from pestle.samplers.migration import void_sites

    # fcc: the largest voids are the octahedral sites, one per atom, radius a/2.
    host = cu.atoms.repeat(2)
    sites, radius = void_sites(host)
    assert len(sites) == len(host) and radius == pytest.approx(3.61 / 2)
    params = {"species": "Cu", "kind": "interstitial", "potential": EMT_POTENTIAL, "n_images": 3}
    images = sample("migration", params, cu)
    assert len(images) == 5 and all(len(c.atoms) == len(host) + 1 for c in images)
    assert images[0].params["hop_distance"] == pytest.approx(3.61 / 2**0.5)  # oct -> oct
    moving = images[0].params["moving_atom"]
    assert moving == len(host)
    # Only the interstitial travels between the endpoints; the host stays put.
    np.testing.assert_allclose(images[0].atoms.positions[:moving], host.positions, atol=1e-8)
    np.testing.assert_allclose(images[-1].atoms.positions[:moving], host.positions, atol=1e-8)
    hop = images[-1].atoms.positions[moving] - images[0].atoms.positions[moving]
    assert np.linalg.norm(hop) == pytest.approx(3.61 / 2**0.5)
    assert images[0].params["predicted_barrier_eV"] > 0
    # Rock salt: the largest voids are the tetrahedral sites, a/2 apart.
    li = sample(
        "migration", {"species": "Li", "kind": "interstitial", "predict_barrier": False}, lif
    )
    assert li[0].params["hop_distance"] == pytest.approx(4.03 / 2)
