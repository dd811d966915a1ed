"""Named query filters and the exports a user trains with: ASE database, CHGNet's JSON (read
back by chgnet's own StructureJsonData) and MACE's extxyz (read back by mace's own loader),
on labels computed with a real calculator (EMT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.stress import voigt_6_to_full_3x3_stress

from pestle.export import EXPORTERS
from pestle.store import Store
from pestle.store.queries import build_filter, normalise_system


def _label(store: Store, atoms, sampler: str, parent: str | None = None) -> str:
    atoms = atoms.copy()
    sid, _ = store.structures.add(
        atoms, kind="candidate", provenance={"sampler": sampler, "parent_id": parent}
    )
    atoms.calc = EMT()
    store.labels.put(
        sid,
        labeller="emt",
        level_of_theory={"code": "emt"},
        lot_hash="emt",
        energy=atoms.get_potential_energy(),
        forces=atoms.get_forces(),
        stress=atoms.get_stress(),
    )
    return sid


@pytest.fixture
def filled(store: Store) -> Store:
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.1, seed=1)
    _label(store, cu, "rattle", parent="seed-cu")
    hot = bulk("Cu", "fcc", a=3.6, cubic=True)
    hot.rattle(0.3, seed=2)
    _label(store, hot, "rattle", parent="seed-cu")
    alloy = bulk("Cu", "fcc", a=3.7, cubic=True)
    alloy.symbols[0] = "Au"
    alloy.rattle(0.05, seed=3)
    _label(store, alloy, "solid_solution", parent="seed-cu")
    plain = bulk("Al", "fcc", a=4.05, cubic=True)
    store.structures.add(plain, kind="candidate", provenance={"sampler": "strain"})
    return store


def test_named_filters(filled: Store) -> None:
    def ids(collection: str, **named) -> int:
        return filled.count(collection, build_filter(filled, collection, **named))

    assert normalise_system("Li-F") == normalise_system("LiF") == "F-Li"
    assert ids("structures", elements=["Cu"]) == 3
    assert ids("structures", elements=["Cu", "Au"]) == 1
    assert ids("labels", system="Cu-Au") == 1
    assert ids("structures", formula="Cu4") == 2  # reduced: Cu
    assert ids("labels", sampler="rattle") == 2
    assert ids("structures", labelled=False) == 1
    assert ids("structures", labelled=True) == 3
    hot = max(filled.labels.find(), key=lambda label: label.max_force)
    assert ids("labels", force_min=hot.max_force - 1e-9) == 1
    assert ids("structures", force_max=hot.max_force - 1e-9) == 2
    energy = hot.energy_per_atom
    assert ids("labels", energy_min=energy, energy_max=energy) == 1
    with pytest.raises(ValueError, match="empty range"):
        build_filter(filled, "labels", force_min=2, force_max=1)
    assert ids("labels", base={"natoms": 4}, elements=["Au"]) == 1


def test_ase_db_round_trip(filled: Store, tmp_path) -> None:
    import ase.db

    path = tmp_path / "labels.db"
    assert EXPORTERS["ase-db"](filled, path) == 3
    assert EXPORTERS["ase-db"](filled, path) == 0  # rows already there are not duplicated
    database = ase.db.connect(str(path))
    for stored, row in zip(filled.labels.labelled({}), database.select(sort="id"), strict=True):
        atoms = stored.atoms
        assert row.label_id == stored.label_id
        np.testing.assert_allclose(row.forces, atoms.get_forces())
        np.testing.assert_allclose(row.stress, atoms.get_stress())
        assert row.energy == pytest.approx(atoms.get_potential_energy())


def test_chgnet_json_reads_back_in_chgnets_units(filled: Store, tmp_path) -> None:
    from chgnet.data.dataset import StructureJsonData
    from chgnet.graph import CrystalGraphConverter

    path = tmp_path / "chgnet.json"
    assert EXPORTERS["chgnet"](filled, path) == 3
    assert list(json.loads(path.read_text())) == ["seed-cu"]  # grouped by parent
    dataset = StructureJsonData(
        str(path), graph_converter=CrystalGraphConverter(), targets="efs", shuffle=False
    )
    by_label = {s.label_id: s.atoms for s in filled.labels.labelled({})}
    for index, (_, label_id) in enumerate(dataset.keys):
        _, targets = dataset[index]
        atoms = by_label[label_id]
        np.testing.assert_allclose(targets["f"].numpy(), atoms.get_forces(), atol=1e-5)
        # chgnet's targets are GPa with ASE's sign, what its model predicts.
        expected = voigt_6_to_full_3x3_stress(atoms.get_stress()) / units.GPa
        np.testing.assert_allclose(targets["s"].numpy(), expected, atol=1e-4)
        assert float(targets["e"]) == pytest.approx(
            atoms.get_potential_energy() / len(atoms), abs=1e-5
        )


def test_mace_xyz_reads_back_with_mace(filled: Store, tmp_path) -> None:
    from ase.io import read

    path = tmp_path / "mace.xyz"
    assert EXPORTERS["mace"](filled, path) == 3
    frames = read(path, index=":")
    assert {f.info["config_type"] for f in frames} == {"rattle", "solid_solution"}
    for frame, atoms in zip(frames, [s.atoms for s in filled.labels.labelled({})], strict=True):
        assert frame.calc is None  # references are data, not a calculator's predictions
        assert frame.info["REF_energy"] == pytest.approx(atoms.get_potential_energy())
        np.testing.assert_allclose(frame.arrays["REF_forces"], atoms.get_forces())
        np.testing.assert_allclose(frame.info["REF_stress"], atoms.get_stress())

    from pestle.potentials.mace import import_mace

    mace_utils = import_mace("mace.data.utils")
    _, configs = mace_utils.load_from_xyz(str(path), mace_utils.KeySpecification.from_defaults())
    for config, atoms in zip(configs, [s.atoms for s in filled.labels.labelled({})], strict=True):
        assert config.properties["energy"] == pytest.approx(atoms.get_potential_energy())
        np.testing.assert_allclose(config.properties["forces"], atoms.get_forces())
        # Voigt in ASE order and sign; mace turns it into a 3x3 matrix when it builds graphs.
        np.testing.assert_allclose(config.properties["stress"], atoms.get_stress())


# --- labels as a real campaign stores them: a seed (no parent, no sampler, no rng_seed) and a
# candidate whose provenance carries the 63-bit rng_seed a sampler stream draws.
BIG_SEED = 910717115563190011


@pytest.fixture
def campaign_like(store: Store) -> Store:
    seed = bulk("Cu", "fcc", a=3.6, cubic=True)
    seed_id = _label_with(store, seed, kind="seed", provenance={"campaign": "c"})
    child = seed.copy()
    child.rattle(0.1, seed=4)
    _label_with(
        store,
        child,
        kind="candidate",
        provenance={"sampler": "rattle", "parent_id": seed_id, "rng_seed": BIG_SEED,
                    "params": {"amplitude": 0.1}},
    )  # fmt: skip
    return store


def _label_with(store: Store, atoms, *, kind: str, provenance: dict) -> str:
    atoms = atoms.copy()
    sid, _ = store.structures.add(atoms, kind=kind, provenance=provenance)
    atoms.calc = EMT()
    store.labels.put(sid, labeller="emt", level_of_theory={"code": "ase-emt"}, lot_hash="emt",
                     energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                     stress=atoms.get_stress())  # fmt: skip
    return sid


def test_ase_db_export_of_real_provenance(campaign_like: Store, tmp_path) -> None:
    """Used to fail on every real store: rng_seed went in as a string of digits, which
    ase.db refuses."""
    import ase.db

    path = tmp_path / "x.db"
    assert EXPORTERS["ase-db"](campaign_like, path) == 2
    rows = {row.label_id: row for row in ase.db.connect(str(path)).select()}
    stored = {s.label_id: s for s in campaign_like.labels.labelled({})}
    for label_id, row in rows.items():
        provenance = stored[label_id].structure.provenance
        assert row.get("rng_seed") == provenance.rng_seed  # an int, exact, or absent
        assert row.get("parent_id") == provenance.parent_id
        assert row.energy == pytest.approx(stored[label_id].atoms.get_potential_energy())


def test_ase_db_export_that_fails_leaves_no_file(campaign_like: Store, tmp_path, monkeypatch):
    import ase.db.core

    def refuse(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ase.db.core.Database, "write", refuse)
    with pytest.raises(RuntimeError, match="disk full"):
        EXPORTERS["ase-db"](campaign_like, tmp_path / "x.db")
    assert not (tmp_path / "x.db").exists()


def test_ase_db_export_onto_a_file_of_another_kind_is_refused_untouched(
    campaign_like: Store, tmp_path
) -> None:
    """An existing file that is not an ASE database: an OSError naming it (the CLI's
    `cannot write ...`, exit 3), and the file is left as it was."""
    other = tmp_path / "notes.db"
    other.write_text("not a database")
    with pytest.raises(OSError, match="notes.db exists and is not an ASE database"):
        EXPORTERS["ase-db"](campaign_like, other)
    assert other.read_text() == "not a database"


@pytest.mark.parametrize("fmt", ["extxyz", "mace"])
def test_extxyz_exports_keep_every_key_after_a_seed(campaign_like: Store, fmt, tmp_path) -> None:
    """A seed's empty parent_id was written as ``parent_id=`` and ASE's reader then took the
    next key as its value (rng_seed, or even energy)."""
    from ase.io import read

    path = tmp_path / "x.xyz"
    assert EXPORTERS[fmt](campaign_like, path) == 2
    frames = read(path, index=":")
    stored = list(campaign_like.labels.labelled({}))
    for frame, label in zip(frames, stored, strict=True):
        provenance = label.structure.provenance
        assert frame.info.get("parent_id") == provenance.parent_id
        assert frame.info.get("rng_seed") == provenance.rng_seed
        assert frame.info["label_id"] == label.label_id
        assert frame.info["lot_hash"] == "emt"
        assert json.loads(frame.info["sampler_params"]) == provenance.params
        energy = frame.info["REF_energy"] if fmt == "mace" else frame.get_potential_energy()
        assert energy == pytest.approx(label.atoms.get_potential_energy())


# --- the energy convention: every export says which energy its labels hold.
GPAW_THEORY = {"code": "gpaw", "xc": "PBE", "smearing": {"name": "fermi-dirac", "width": 0.05}}
GPAW_CONVENTION = {"energy_convention": "free", "energy_code": "gpaw",
                   "energy_smearing": "fermi-dirac", "energy_smearing_width": 0.05}  # fmt: skip
EMT_CONVENTION = {"energy_convention": "total", "energy_code": "ase-emt"}


@pytest.fixture
def two_theories(store: Store) -> Store:
    for index, (labeller, theory) in enumerate((("gpaw", GPAW_THEORY), ("emt", {"code": "x"}))):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=index)
        sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "rattle"})
        atoms.calc = EMT()
        store.labels.put(sid, labeller=labeller, level_of_theory=theory, lot_hash=labeller,
                         energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                         stress=atoms.get_stress())  # fmt: skip
    return store


def _expected(label_id: str) -> dict:
    return GPAW_CONVENTION if label_id.endswith("-gpaw") else EMT_CONVENTION


@pytest.mark.parametrize("fmt", ["extxyz", "mace"])
def test_extxyz_exports_record_the_energy_convention(two_theories, fmt, tmp_path) -> None:
    from ase.io import read

    EXPORTERS[fmt](two_theories, tmp_path / "x.xyz")
    frames = read(tmp_path / "x.xyz", index=":")
    assert len(frames) == 2
    for frame in frames:
        expected = _expected(frame.info["label_id"])
        assert {k: frame.info.get(k) for k in GPAW_CONVENTION if k in frame.info} == expected


def test_ase_db_and_chgnet_exports_record_the_energy_convention(two_theories, tmp_path):
    import ase.db

    EXPORTERS["ase-db"](two_theories, tmp_path / "x.db")
    rows = list(ase.db.connect(str(tmp_path / "x.db")).select())
    assert len(rows) == 2
    for row in rows:
        found = {k: row.key_value_pairs[k] for k in GPAW_CONVENTION if k in row.key_value_pairs}
        assert found == _expected(row.label_id)
    # Searchable with ase.db's own selections.
    assert [
        r.label_id for r in ase.db.connect(str(tmp_path / "x.db")).select(energy_convention="free")
    ] == [r.label_id for r in rows if r.label_id.endswith("-gpaw")]

    EXPORTERS["chgnet"](two_theories, tmp_path / "c.json")
    entries = {lid: e for group in json.loads((tmp_path / "c.json").read_text()).values()
               for lid, e in group.items()}  # fmt: skip
    for label_id, entry in entries.items():
        assert {k: entry[k] for k in GPAW_CONVENTION if k in entry} == _expected(label_id)


def test_energy_convention_of_each_labeller() -> None:
    from pestle.labellers import LABELLERS, energy_convention

    gpaw = LABELLERS.build("gpaw", {"smearing": "marzari-vanderbilt", "smearing_width": 0.1})
    assert energy_convention("gpaw", gpaw.level_of_theory()) == {
        "energy_convention": "free", "energy_code": "gpaw",
        "energy_smearing": "marzari-vanderbilt", "energy_smearing_width": 0.1,
    }  # fmt: skip
    vasp = LABELLERS.build("vasp", {"user_incar_settings": {"ISMEAR": 0, "SIGMA": 0.03}})
    assert energy_convention("vasp", vasp.level_of_theory())["energy_smearing"] == "gaussian"
    assert energy_convention("vasp", {"incar": {"ISMEAR": -5}}) == {
        "energy_convention": "free", "energy_code": "vasp",
        "energy_smearing": "tetrahedron-blochl",
    }  # fmt: skip
    assert energy_convention("emt", {})["energy_convention"] == "total"
    assert energy_convention("gone-plugin", {"code": "qe"}) == {
        "energy_convention": "unknown", "energy_code": "qe"}  # fmt: skip
