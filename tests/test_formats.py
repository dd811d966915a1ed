"""pestle.formats on plain annotated Atoms (no store): what each writer puts in its file, that
it leaves its input alone, and the MACE reader the trainer uses for replay data.
(test_export_query.py reads the exports back with chgnet's and mace's own loaders.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from pestle.formats import (
    read_mace_xyz,
    write_ase_db,
    write_chgnet_json,
    write_extxyz,
    write_mace_xyz,
)
from pestle.formats.mace_xyz import mace_frame


def labelled(atoms: Atoms, label_id: str, **info: str) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update({"structure_id": f"s-{label_id}", "label_id": label_id, **info})
    return atoms


@pytest.fixture
def images() -> list[Atoms]:
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=1)
    hot = bulk("Cu", "fcc", a=3.6, cubic=True)
    hot.rattle(0.2, seed=2)
    return [
        labelled(cu, "l-1", sampler="rattle", parent_id="seed-cu"),
        labelled(hot, "l-2", sampler="rattle", parent_id="seed-cu"),
        labelled(bulk("Au", "fcc", a=4.08, cubic=True), "l-3", sampler="strain", parent_id="-"),
    ]


def unchanged(images: list[Atoms]) -> list[tuple]:
    return [(dict(a.info), a.calc, a.positions.copy()) for a in images]


def test_extxyz_round_trips_results_and_info(images, tmp_path) -> None:
    before = unchanged(images)
    assert write_extxyz(tmp_path / "x.xyz", images) == 3
    for frame, atoms in zip(read(tmp_path / "x.xyz", index=":"), images, strict=True):
        assert frame.get_potential_energy() == pytest.approx(atoms.get_potential_energy())
        np.testing.assert_allclose(frame.get_forces(), atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(frame.get_stress(), atoms.get_stress())
        assert frame.info["label_id"] == atoms.info["label_id"]
    assert unchanged(images)[0][1] is before[0][1]


def test_mace_xyz_puts_labels_under_ref_keys(images, tmp_path) -> None:
    before = unchanged(images)
    assert write_mace_xyz(tmp_path / "m.xyz", images) == 3
    frames = read(tmp_path / "m.xyz", index=":")
    for frame, atoms in zip(frames, images, strict=True):
        assert frame.calc is None
        assert frame.info["REF_energy"] == pytest.approx(atoms.get_potential_energy())
        np.testing.assert_allclose(frame.arrays["REF_forces"], atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(frame.info["REF_stress"], atoms.get_stress())
    # The sampler is mace's config_type ("seed" when it has none).
    assert [f.info["config_type"] for f in frames] == ["rattle", "rattle", "strain"]
    seed = images[0].copy()
    seed.calc, seed.info["sampler"] = images[0].calc, ""
    assert mace_frame(seed).info["config_type"] == "seed"
    # The input keeps its calculator and info.
    after = unchanged(images)
    assert all(a[0] == b[0] and a[1] is b[1] for a, b in zip(before, after, strict=True))


def test_mace_xyz_without_provenance_has_no_config_type(tmp_path) -> None:
    atoms = labelled(bulk("Cu", "fcc", a=3.6), "l-9")
    del atoms.info["structure_id"], atoms.info["label_id"]
    write_mace_xyz(tmp_path / "m.xyz", [atoms])
    (frame,) = read(tmp_path / "m.xyz", index=":")
    assert "config_type" not in frame.info


def test_read_mace_xyz_takes_ref_keys_or_calculator_results(images, tmp_path) -> None:
    # Labels under REF_ keys (as pestle writes them) and as plain ASE results.
    write_mace_xyz(tmp_path / "ref.xyz", images)
    water = molecule("H2O", vacuum=3.0)  # not periodic: no stress kept
    water.calc = SinglePointCalculator(
        water, energy=-1.5, forces=np.ones((3, 3)), stress=np.arange(6.0)
    )
    water.info["config_weight"] = 2.0
    write(tmp_path / "plain.xyz", [water, *images[:1]], format="extxyz")

    from_ref = read_mace_xyz(tmp_path / "ref.xyz")
    assert [f.info.get("config_type") for f in from_ref] == ["rattle", "rattle", "strain"]
    for frame, atoms in zip(from_ref, images, strict=True):
        assert "label_id" not in frame.info  # only what mace reads comes along
        assert frame.get_potential_energy() == pytest.approx(atoms.get_potential_energy())
        np.testing.assert_allclose(frame.get_stress(), atoms.get_stress())

    plain = read_mace_xyz(tmp_path / "plain.xyz")
    assert plain[0].calc.results.get("stress") is None
    assert plain[0].info["config_weight"] == 2.0
    assert plain[0].get_potential_energy() == -1.5
    np.testing.assert_allclose(plain[1].get_forces(), images[0].get_forces(), atol=1e-10)

    subset = read_mace_xyz(tmp_path / "ref.xyz", limit=2, seed=0)
    assert len(subset) == 2
    energies = [a.get_potential_energy() for a in images]
    picked = [energies.index(pytest.approx(f.get_potential_energy())) for f in subset]
    assert picked == sorted(picked)  # file order kept

    unlabelled = Atoms("H", positions=[[0, 0, 0]])
    write(tmp_path / "bad.xyz", [unlabelled], format="extxyz")
    with pytest.raises(ValueError, match=r"bad\.xyz: structure 0 has no energy or forces"):
        read_mace_xyz(tmp_path / "bad.xyz")


def test_chgnet_json_groups_by_parent(images, tmp_path) -> None:
    assert write_chgnet_json(tmp_path / "c.json", images) == 3
    data = json.loads((tmp_path / "c.json").read_text())
    assert {k: sorted(v) for k, v in data.items()} == {"seed-cu": ["l-1", "l-2"], "-": ["l-3"]}
    images[2].info["parent_id"] = ""  # no parent: grouped under its own id
    write_chgnet_json(tmp_path / "c.json", images)
    assert "s-l-3" in json.loads((tmp_path / "c.json").read_text())
    entry = data["seed-cu"]["l-1"]
    assert entry["energy_per_atom"] == pytest.approx(images[0].get_potential_energy() / 4)
    assert "label_id" in images[0].info  # the input keeps its info


def test_ase_db_skips_rows_already_there(images, tmp_path) -> None:
    import ase.db

    path = tmp_path / "l.db"
    assert write_ase_db(path, images[:2]) == 2
    assert write_ase_db(path, images) == 1
    rows = list(ase.db.connect(str(path)).select(sort="id"))
    assert [row.label_id for row in rows] == ["l-1", "l-2", "l-3"]
    assert rows[0].sampler == "rattle"
    np.testing.assert_allclose(rows[2].forces, images[2].get_forces(), atol=1e-10)
    assert images[0].info["label_id"] == "l-1"  # the input keeps its info


@pytest.mark.parametrize("writer", [write_extxyz, write_mace_xyz])
def test_extxyz_writers_survive_empty_string_info(writer, images, tmp_path) -> None:
    """ASE writes an empty string as ``key=`` and its reader then swallows the next key;
    the writers leave empty strings out instead."""
    images[0].info.update(parent_id="", note="", rng_seed=7)
    writer(tmp_path / "x.xyz", images)
    frame = read(tmp_path / "x.xyz", index=0)
    assert "parent_id" not in frame.info and "note" not in frame.info
    assert frame.info["rng_seed"] == 7 and frame.info["label_id"] == "l-1"
    assert images[0].info["parent_id"] == ""  # the input keeps its info


def test_ase_db_keeps_what_it_cannot_search_in_data(images, tmp_path) -> None:
    """ase.db refuses strings that read as numbers (a hash of digits) and keys it reserves
    as key-value pairs; those go in the row's data instead of failing the export."""
    import ase.db

    images[0].info.update(lot_hash="1234567890123456", rng_seed=910717115563190011,
                          energy_note="total", params={"a": 1})  # fmt: skip
    assert write_ase_db(tmp_path / "l.db", images) == 3
    row = next(ase.db.connect(str(tmp_path / "l.db")).select(label_id="l-1"))
    assert row.rng_seed == 910717115563190011 and row.energy_note == "total"
    assert row.data["lot_hash"] == "1234567890123456" and row.data["params"] == {"a": 1}
