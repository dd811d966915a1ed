"""Export labelled structures for training and inspection."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ase.io import write

from pestle.store import Store


def write_extxyz(
    store: Store, path: str | os.PathLike, label_filter: Mapping[str, Any] | None = None
) -> int:
    """Write labels as extended XYZ: energy, forces and stress in the calculator fields that
    ``ase.io.read`` gives back; ids, provenance and level of theory in ``info``."""
    images = _annotated(store, label_filter)
    write(path, images, format="extxyz")
    return len(images)


def _annotated(store: Store, label_filter: Mapping[str, Any] | None) -> list:
    """Labelled Atoms (reference results in ``atoms.calc``) with ids and provenance in info."""
    return [stored.atoms for stored in store.labels.labelled(label_filter)]


def write_ase_db(
    store: Store, path: str | os.PathLike, label_filter: Mapping[str, Any] | None = None
) -> int:
    """An ASE database (``ase.db``; SQLite for ``.db``, JSON for ``.json``): one row per label
    with energy, forces and stress, and the ids and provenance as key-value pairs. Rows already
    in the file (same label id) are not written twice."""
    import ase.db

    written = 0
    with ase.db.connect(str(path)) as database:
        for atoms in _annotated(store, label_filter):
            info = dict(atoms.info)
            atoms.info = {}
            if database.count(label_id=info["label_id"]):
                continue
            database.write(atoms, **{k: v for k, v in info.items() if isinstance(v, str)})
            written += 1
    return written


def write_chgnet_json(
    store: Store, path: str | os.PathLike, label_filter: Mapping[str, Any] | None = None
) -> int:
    """The JSON that ``chgnet.data.dataset.StructureJsonData`` reads: ``{parent: {label_id:
    {structure, energy_per_atom, force, stress, magmom}}}``, grouped by parent structure so
    chgnet's split by id keeps a seed's perturbations together. Stress is written in VASP's
    kBar convention (compressive positive), which chgnet multiplies by -0.1 into its GPa."""
    from ase import units
    from ase.stress import voigt_6_to_full_3x3_stress
    from pymatgen.io.ase import AseAtomsAdaptor

    data: dict[str, dict[str, dict]] = {}
    for atoms in _annotated(store, label_filter):
        results = atoms.calc.results
        stress = results.get("stress")
        group = atoms.info.get("parent_id") or atoms.info["structure_id"]
        bare = atoms.copy()
        bare.calc = None
        bare.info = {}
        data.setdefault(group, {})[atoms.info["label_id"]] = {
            "structure": AseAtomsAdaptor.get_structure(bare).as_dict(),
            "energy_per_atom": float(results["energy"]) / len(atoms),
            "force": results["forces"].tolist(),
            "stress": None
            if stress is None
            else (-10.0 * voigt_6_to_full_3x3_stress(stress) / units.GPa).tolist(),
            "magmom": None,
        }
    with open(path, "w") as handle:
        json.dump(data, handle)
    return sum(len(v) for v in data.values())


def write_mace_xyz(
    store: Store, path: str | os.PathLike, label_filter: Mapping[str, Any] | None = None
) -> int:
    """Extended XYZ as mace-torch's ``run_train`` reads it with ``--energy_key=REF_energy
    --forces_key=REF_forces --stress_key=REF_stress``: reference results as plain info/arrays
    (never a calculator, which mace would mistake for predictions), ASE units and sign, and
    the sampler as ``config_type``."""
    images = []
    for atoms in _annotated(store, label_filter):
        results = atoms.calc.results
        atoms.calc = None
        atoms.info["REF_energy"] = float(results["energy"])
        atoms.arrays["REF_forces"] = results["forces"].copy()
        if results.get("stress") is not None:
            atoms.info["REF_stress"] = results["stress"].copy()
        atoms.info["config_type"] = atoms.info.get("sampler") or "seed"
        images.append(atoms)
    write(path, images, format="extxyz")
    return len(images)


EXPORTERS = {
    "extxyz": write_extxyz,
    "ase-db": write_ase_db,
    "chgnet": write_chgnet_json,
    "mace": write_mace_xyz,
}
