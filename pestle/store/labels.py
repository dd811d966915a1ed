"""The ``labels`` collection: reference results, ``_id`` = structure id + level-of-theory
hash, so the same structure at the same level of theory is stored (and computed) once."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from pestle.provenance import code_versions
from pestle.store import batches
from pestle.store.arrays import INLINE_ARRAY_LIMIT, ArrayCodec
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
        for key in ("structure_id", "lot_hash", "chemical_system", "role", "max_force",
                    "energy_per_atom", "sampler", "formula"):  # fmt: skip
            self._c.create_index(key)
        # A campaign's labels: each system at its level of theory.
        self._c.create_index([("lot_hash", 1), ("chemical_system", 1)])

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
        structure: StructureDoc | None = None,
    ) -> bool:
        """Store a label once; returns False (and stores nothing) if it already exists.
        ``role``: decided before the label existed (``evaluation`` for an evaluation set);
        else the split policy records one later. ``structure``: the structure's document
        when the caller has read it already (natoms, chemical system, formula, provenance)."""
        lid = label_id(structure_id, lot_hash)
        if np.size(forces) > INLINE_ARRAY_LIMIT and self.exists(lid):
            return False  # not even a GridFS file for a label that exists
        doc = self.document(
            structure_id, labeller=labeller, level_of_theory=level_of_theory, lot_hash=lot_hash,
            energy=energy, forces=forces, stress=stress, job_id=job_id, extra=extra, role=role,
            structure=structure,
        )  # fmt: skip
        return bool(self.insert_many([doc]))

    def insert_many(self, docs: Sequence[Mapping[str, Any]]) -> set[str]:
        """Store built label documents in one unordered write; the ids stored (a label that
        exists, or that a duplicated task stored first, is not stored again)."""
        if not docs:
            return set()
        try:
            self._c.insert_many([dict(d) for d in docs], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            duplicates = {docs[e["index"]]["_id"] for e in errors}
            return {d["_id"] for d in docs} - duplicates
        return {d["_id"] for d in docs}

    def document(
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
        structure: StructureDoc | None = None,
    ) -> dict[str, Any]:
        """The label document ``put`` stores (checked against its structure)."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown label role {role!r} (known: {', '.join(ROLES)})")
        if structure is None or structure.id != structure_id:
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
        return doc

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
        return {d["_id"] for d in batches.by_ids(self._c, list(label_ids), {"_id": 1})}

    def labelled_structures(self, structure_ids: Iterable[str], lot_hash: str) -> set[str]:
        """Which of these structures have a label at this level of theory."""
        return {
            d["structure_id"]
            for d in batches.by_ids(self._c, list(structure_ids), {"structure_id": 1},
                                    field="structure_id", extra={"lot_hash": lot_hash})
        }  # fmt: skip

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
        for doc in batches.find(self._c, query, {"chemical_system": 1}):
            out[doc["chemical_system"]].append(doc["_id"])
        return dict(sorted(out.items()))

    def systems_of(self, label_ids: Iterable[str]) -> dict[str, str]:
        """The chemical system of each of these labels that exists."""
        return {
            d["_id"]: d["chemical_system"]
            for d in batches.by_ids(self._c, list(label_ids), {"chemical_system": 1})
        }

    def samplers_of(self, label_ids: Iterable[str]) -> dict[str, str]:
        """The sampler that made each of these labels' structures (labels without one left
        out)."""
        extra = {"sampler": {"$ne": None}}
        return {d["_id"]: d["sampler"]
                for d in batches.by_ids(self._c, list(label_ids), {"sampler": 1}, extra=extra)}  # fmt: skip

    def structures_with_roles(
        self, structure_ids: Iterable[str], exclude: Iterable[str] = ()
    ) -> set[str]:
        """Which of these structures have a label with a recorded role (not in ``exclude``)."""
        extra = {"role": {"$nin": [None, *exclude]}}
        return {
            d["structure_id"]
            for d in batches.by_ids(self._c, list(structure_ids), {"structure_id": 1},
                                    field="structure_id", extra=extra)
        }  # fmt: skip

    def roles(self, label_ids: Iterable[str]) -> dict[str, str]:
        """Recorded roles of these labels (labels without one are left out)."""
        extra = {"role": {"$ne": None}}
        return {d["_id"]: d["role"]
                for d in batches.by_ids(self._c, list(label_ids), {"role": 1}, extra=extra)}  # fmt: skip

    def find(
        self, query: Mapping[str, Any] | None = None, fields: Iterable[str] | None = None
    ) -> Iterator[LabelDoc]:
        """Label documents (without reading force arrays unless ``fields`` asks)."""
        projection = {"forces": 0} if fields is None else dict.fromkeys(fields, 1)
        for doc in batches.find(self._c, query, projection):
            yield LabelDoc.model_validate(doc)

    def distinct_structure_ids(self, query: Mapping[str, Any] | None = None) -> list[str]:
        return self._c.distinct("structure_id", dict(query or {}))

    def labelled(self, query: Mapping[str, Any] | None = None) -> Iterator[StoredLabel]:
        """Labels matching a filter with their structures, in label id order: the labels
        streamed, their structures read a batch at a time (not one round trip each)."""
        for part in batches.batched(batches.find(self._c, query), batches.IN_BATCH):
            labels = [LabelDoc.model_validate(raw) for raw in part]
            structures = self._structures.docs_many([label.structure_id for label in labels])
            for label in labels:
                yield self._stored(label, structures.get(label.structure_id))

    def _stored(self, label: LabelDoc, structure: StructureDoc | None) -> StoredLabel:
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
                "level_of_theory": json.dumps(label.level_of_theory, sort_keys=True, default=str),
            }
        )
        # Absent rather than empty when there is none (a seed), and rng_seed an int: an
        # empty string garbles extxyz and a string of digits is refused by ase.db.
        if provenance.parent_id:
            atoms.info["parent_id"] = provenance.parent_id
        if provenance.rng_seed is not None:
            atoms.info["rng_seed"] = int(provenance.rng_seed)
        return StoredLabel(atoms, structure, label)

    def count(self, query: Mapping[str, Any] | None = None) -> int:
        return self._c.count_documents(dict(query or {}))
