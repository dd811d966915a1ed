"""The ``labels`` collection: reference results, ``_id`` = structure id + level-of-theory
hash, so the same structure at the same level of theory is stored (and computed) once."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from pestle.provenance import code_versions
from pestle.store.arrays import ArrayCodec
from pestle.store.documents import ROLES, UNTRAINABLE, LabelDoc, StructureDoc
from pestle.store.errors import StoreError, utcnow
from pestle.store.structures import StructureRepository
from pestle.structures import LabelledStructure


def label_id(structure_id: str, lot_hash: str) -> str:
    return f"{structure_id}-{lot_hash}"


@dataclass
class StoredLabel:
    """A label with its structure: ``atoms`` carry the reference results in a
    SinglePointCalculator and the ids and provenance in ``atoms.info``."""

    atoms: Atoms
    structure: StructureDoc
    label: LabelDoc

    @property
    def label_id(self) -> str:
        return self.label.id

    @property
    def structure_id(self) -> str:
        return self.structure.id

    @property
    def chemical_system(self) -> str:
        return self.label.chemical_system

    @property
    def sampler(self) -> str:
        return self.label.sampler or self.structure.kind

    def labelled(self) -> LabelledStructure:
        return LabelledStructure(self.atoms, self.structure.id, self.label.id)


class LabelRepository:
    def __init__(
        self, collection: Collection, arrays: ArrayCodec, structures: StructureRepository
    ) -> None:
        self._c = collection
        self._arrays = arrays
        self._structures = structures

    def ensure_indexes(self) -> None:
        for key in ("structure_id", "lot_hash", "chemical_system", "role"):
            self._c.create_index(key)

    # -- writing ------------------------------------------------------------------------
    def put(
        self,
        structure_id: str,
        *,
        labeller: str,
        level_of_theory: Mapping[str, Any],
        lot_hash: str,
        energy: float,
        forces: np.ndarray,
        stress: np.ndarray | None,
        job_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        role: str | None = None,
    ) -> bool:
        """Store a label once; returns False (and stores nothing) if it already exists.
        ``role``: decided before the label existed (``evaluation`` for an evaluation set);
        else the split policy records one later."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown label role {role!r} (known: {', '.join(ROLES)})")
        structure = self._structures.get(structure_id)
        if structure is None:
            raise StoreError(f"cannot label unknown structure {structure_id}")
        forces = np.asarray(forces, dtype=float)
        if forces.shape != (structure.natoms, 3):
            raise StoreError(
                f"label for {structure_id}: forces have shape {forces.shape}, "
                f"expected ({structure.natoms}, 3)"
            )
        lid = label_id(structure_id, lot_hash)
        if self.exists(lid):
            return False
        doc = LabelDoc(
            _id=lid,
            structure_id=structure_id,
            labeller=labeller,
            level_of_theory=dict(level_of_theory),
            lot_hash=lot_hash,
            energy=float(energy),
            energy_per_atom=float(energy) / structure.natoms,
            forces=self._arrays.put(forces, f"forces-{lid}"),
            max_force=float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0,
            stress=None if stress is None else np.asarray(stress, dtype=float).tolist(),
            natoms=structure.natoms,
            chemical_system=structure.chemical_system,
            formula=structure.formula,
            sampler=structure.provenance.sampler,
            job_id=job_id,
            extra=dict(extra or {}),
            code_versions=code_versions(),
            created_at=utcnow(),
            role=role,
        ).to_mongo()
        doc.pop("split")
        if role is None:  # the split policy decides it later; a missing field means undecided
            doc.pop("role")
        try:
            self._c.insert_one(doc)
        except DuplicateKeyError:
            return False  # a duplicated task got there first: one label, never two
        return True

    def set_roles(self, roles: Mapping[str, str], policy: Mapping[str, Any]) -> int:
        """Record each label's role; a label that has a role keeps it (roles never change:
        a label a model trained on can never become a held-out label later)."""
        bad = {r for r in roles.values() if r not in ROLES}
        if bad:
            raise ValueError(f"unknown label roles {sorted(bad)} (known: {', '.join(ROLES)})")
        if not roles:
            return 0
        now = utcnow()
        result = self._c.bulk_write(
            [UpdateOne({"_id": lid, "role": None},
                       {"$set": {"role": role, "split": {**dict(policy), "at": now}}})
             for lid, role in roles.items()],
            ordered=False,
        )  # fmt: skip
        return result.modified_count

    # -- reading ------------------------------------------------------------------------
    def exists(self, lid: str) -> bool:
        return bool(self._c.count_documents({"_id": lid}, limit=1))

    def get(self, lid: str) -> LabelDoc | None:
        doc = self._c.find_one({"_id": lid})
        return None if doc is None else LabelDoc.model_validate(doc)

    def existing(self, label_ids: Iterable[str]) -> set[str]:
        return {d["_id"] for d in self._c.find({"_id": {"$in": list(label_ids)}}, {"_id": 1})}

    def labelled_structures(self, structure_ids: Iterable[str], lot_hash: str) -> set[str]:
        """Which of these structures have a label at this level of theory."""
        query = {"structure_id": {"$in": list(structure_ids)}, "lot_hash": lot_hash}
        return {d["structure_id"] for d in self._c.find(query, {"structure_id": 1})}

    def for_structure(self, structure_id: str) -> LabelDoc | None:
        doc = self._c.find_one({"structure_id": structure_id}, {"forces": 0})
        return None if doc is None else LabelDoc.model_validate(doc)

    def ids_by_system(
        self, lot_hash: str, systems: Iterable[str] | None = None, *, trainable: bool = False
    ) -> dict[str, list[str]]:
        """Label ids at one level of theory, per chemical system, sorted; ``trainable``
        leaves out evaluation-set and check labels (never trained on)."""
        query: dict[str, Any] = {"lot_hash": lot_hash}
        if trainable:
            query["role"] = {"$nin": list(UNTRAINABLE)}
        if systems is not None:
            query["chemical_system"] = {"$in": list(systems)}
        out: dict[str, list[str]] = defaultdict(list)
        for doc in self._c.find(query, {"chemical_system": 1}).sort("_id", 1):
            out[doc["chemical_system"]].append(doc["_id"])
        return dict(sorted(out.items()))

    def systems_of(self, label_ids: Iterable[str]) -> dict[str, str]:
        """The chemical system of each of these labels that exists."""
        query = {"_id": {"$in": list(label_ids)}}
        return {d["_id"]: d["chemical_system"] for d in self._c.find(query, {"chemical_system": 1})}

    def structures_with_roles(
        self, structure_ids: Iterable[str], exclude: Iterable[str] = ()
    ) -> set[str]:
        """Which of these structures have a label with a recorded role (not in ``exclude``)."""
        query = {"structure_id": {"$in": list(structure_ids)},
                 "role": {"$nin": [None, *exclude]}}  # fmt: skip
        return {d["structure_id"] for d in self._c.find(query, {"structure_id": 1})}

    def roles(self, label_ids: Iterable[str]) -> dict[str, str]:
        """Recorded roles of these labels (labels without one are left out)."""
        query = {"_id": {"$in": list(label_ids)}, "role": {"$ne": None}}
        return {d["_id"]: d["role"] for d in self._c.find(query, {"role": 1})}

    def find(
        self, query: Mapping[str, Any] | None = None, fields: Iterable[str] | None = None
    ) -> Iterator[LabelDoc]:
        """Label documents (without reading force arrays unless ``fields`` asks)."""
        projection = {"forces": 0} if fields is None else dict.fromkeys(fields, 1)
        for doc in self._c.find(dict(query or {}), projection).sort("_id", 1):
            yield LabelDoc.model_validate(doc)

    def distinct_structure_ids(self, query: Mapping[str, Any] | None = None) -> list[str]:
        return self._c.distinct("structure_id", dict(query or {}))

    def labelled(self, query: Mapping[str, Any] | None = None) -> Iterator[StoredLabel]:
        """Labels matching a filter with their structures, in label id order."""
        for raw in self._c.find(dict(query or {})).sort("_id", 1):
            label = LabelDoc.model_validate(raw)
            structure = self._structures.get(label.structure_id)
            if structure is None:
                raise StoreError(f"label {label.id} names a missing structure")
            atoms = self._structures.atoms_of(structure)
            atoms.calc = SinglePointCalculator(
                atoms,
                energy=label.energy,
                forces=self._arrays.get(label.forces),
                stress=None if label.stress is None else np.asarray(label.stress),
            )
            provenance = structure.provenance
            atoms.info.update(
                {
                    "structure_id": structure.id,
                    "label_id": label.id,
                    "chemical_system": label.chemical_system,
                    "sampler": provenance.sampler or structure.kind,
                    "sampler_params": json.dumps(provenance.params, sort_keys=True),
                    "labeller": label.labeller,
                    "lot_hash": label.lot_hash,
                    "level_of_theory": json.dumps(
                        label.level_of_theory, sort_keys=True, default=str
                    ),
                }
            )
            # Absent rather than empty when there is none (a seed), and rng_seed an int: an
            # empty string garbles extxyz and a string of digits is refused by ase.db.
            if provenance.parent_id:
                atoms.info["parent_id"] = provenance.parent_id
            if provenance.rng_seed is not None:
                atoms.info["rng_seed"] = int(provenance.rng_seed)
            yield StoredLabel(atoms, structure, label)

    def count(self, query: Mapping[str, Any] | None = None) -> int:
        return self._c.count_documents(dict(query or {}))
