"""The ``structures`` collection: seeds and candidates, ``_id`` = canonical fingerprint."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from pymongo import UpdateOne
from pymongo.collection import Collection

from pestle.provenance import code_versions
from pestle.store import batches
from pestle.store.arrays import ArrayCodec
from pestle.store.documents import Selection, StructureDoc
from pestle.store.errors import StoreError, utcnow
from pestle.structures import (
    atoms_from_dict,
    atoms_to_dict,
    chemical_system,
    fingerprint,
    reduced_formula,
)


@dataclass
class NewStructure:
    """A structure to store, with where it came from."""

    atoms: Atoms
    kind: str
    provenance: Mapping[str, Any]
    name: str | None = None


class StructureRepository:
    def __init__(self, collection: Collection, arrays: ArrayCodec) -> None:
        self._c = collection
        self._arrays = arrays

    def ensure_indexes(self) -> None:
        for key in (
            "chemical_system",
            "kind",
            "provenance.sampler",
            "provenance.parent_id",
            "runs",
            "evaluation_for",
            "formula",
            "elements",
        ):
            self._c.create_index(key)
        # A run's candidates, one chemical system at a time (score, select, evaluation set).
        self._c.create_index([("runs", 1), ("kind", 1), ("chemical_system", 1)])

    # -- writing ------------------------------------------------------------------------
    def _insert_doc(self, item: NewStructure) -> tuple[str, dict[str, Any]]:
        atoms = item.atoms
        sid = fingerprint(atoms)
        geometry = atoms_to_dict(atoms)
        positions = geometry.pop("positions")
        doc = StructureDoc(
            _id=sid,
            kind=item.kind,
            name=item.name,
            natoms=len(atoms),
            formula=reduced_formula(atoms),
            chemical_system=chemical_system(atoms),
            elements=sorted(set(atoms.get_chemical_symbols())),
            geometry=geometry,
            positions=self._arrays.put(np.asarray(positions), f"positions-{sid}"),
            provenance={**dict(item.provenance), "code_versions": code_versions()},
            created_at=utcnow(),
        ).to_mongo()
        # Fields a later run adds to are never part of the insert.
        for key in ("_id", "runs", "scores", "embeddings", "selection", "evaluation_for"):
            doc.pop(key)
        return sid, doc

    def add(
        self,
        atoms: Atoms,
        *,
        kind: str,
        provenance: Mapping[str, Any],
        run_id: str | None = None,
        name: str | None = None,
    ) -> tuple[str, bool]:
        """Insert a seed or candidate; returns (fingerprint id, newly inserted).

        An existing structure keeps its first provenance (a later run that regenerates it
        only adds its run id), so deduplication never rewrites history."""
        [(sid, new)] = self.add_many([NewStructure(atoms, kind, provenance, name)], run_id=run_id)
        return sid, new

    def add_many(
        self, items: Sequence[NewStructure], *, run_id: str | None = None
    ) -> list[tuple[str, bool]]:
        """``add`` for many structures in one unordered bulk write."""
        if not items:
            return []
        operations, ids = [], []
        for item in items:
            sid, doc = self._insert_doc(item)
            update: dict[str, Any] = {"$setOnInsert": doc}
            if run_id is not None:
                update["$addToSet"] = {"runs": run_id}
            operations.append(UpdateOne({"_id": sid}, update, upsert=True))
            ids.append(sid)
        result = self._c.bulk_write(operations, ordered=False)
        inserted = {ids[index] for index in result.upserted_ids}
        seen: set[str] = set()
        out = []
        for sid in ids:  # a structure given twice in one call is new only the first time
            out.append((sid, sid in inserted and sid not in seen))
            seen.add(sid)
        return out

    def set_scores(self, scores: Mapping[str, Mapping[str, float]], key: str) -> None:
        """Scores per structure id, under the identity ``key`` of what scored them."""
        if scores:
            self._c.bulk_write(
                [UpdateOne({"_id": sid}, {"$set": {f"scores.{key}": dict(values)}})
                 for sid, values in scores.items()],
                ordered=False,
            )  # fmt: skip

    def set_embeddings(self, embeddings: Mapping[str, Any], key: str) -> None:
        if embeddings:
            self._c.bulk_write(
                [UpdateOne({"_id": sid}, {"$set": {f"embeddings.{key}": np.asarray(v).tolist()}})
                 for sid, v in embeddings.items()],
                ordered=False,
            )  # fmt: skip

    def record_selection(self, run_id: str, picks: Mapping[str, Selection]) -> None:
        """Why run ``run_id`` picked each of these structures."""
        if picks:
            self._c.bulk_write(
                [UpdateOne({"_id": sid}, {"$set": {f"selection.{run_id}": pick.model_dump()}})
                 for sid, pick in picks.items()],
                ordered=False,
            )  # fmt: skip

    def add_to_evaluation_set(self, campaign: str, structure_ids: Iterable[str]) -> None:
        for part in batches.batched(dict.fromkeys(structure_ids)):
            self._c.update_many({"_id": {"$in": part}}, {"$addToSet": {"evaluation_for": campaign}})

    # -- reading ------------------------------------------------------------------------
    def evaluation_set(
        self, campaign: str, systems: Iterable[str] | None = None
    ) -> dict[str, list[str]]:
        """A campaign's evaluation set: structure ids per chemical system."""
        wanted = None if systems is None else set(systems)
        out: dict[str, list[str]] = {}
        for doc in batches.find(self._c, {"evaluation_for": campaign}, {"chemical_system": 1}):
            if wanted is None or doc["chemical_system"] in wanted:
                out.setdefault(doc["chemical_system"], []).append(doc["_id"])
        return out

    def get(self, structure_id: str) -> StructureDoc | None:
        doc = self._c.find_one({"_id": structure_id})
        return None if doc is None else StructureDoc.model_validate(doc)

    def atoms(self, structure_id: str) -> Atoms:
        doc = self.get(structure_id)
        if doc is None:
            raise StoreError(f"no structure {structure_id}")
        return self.atoms_of(doc)

    def atoms_of(self, doc: StructureDoc) -> Atoms:
        geometry = dict(doc.geometry)
        geometry["positions"] = self._arrays.get(doc.positions)
        return atoms_from_dict(geometry)

    def atoms_many(self, structure_ids: Sequence[str]) -> dict[str, Atoms]:
        """The geometry of each of these structures that exists, read in batches."""
        out = {}
        for doc in batches.by_ids(self._c, structure_ids, {"geometry": 1, "positions": 1}):
            geometry = dict(doc["geometry"])
            geometry["positions"] = self._arrays.get(doc["positions"])
            out[doc["_id"]] = atoms_from_dict(geometry)
        return out

    def raw_many(self, structure_ids: Sequence[str], fields: Iterable[str]) -> dict[str, dict]:
        """The stored documents of these structures as plain dicts (to send to a worker),
        read in batches."""
        projection = dict.fromkeys(fields, 1)
        return {doc["_id"]: doc for doc in batches.by_ids(self._c, structure_ids, projection)}

    def docs_many(
        self, structure_ids: Sequence[str], fields: Iterable[str] | None = None
    ) -> dict[str, StructureDoc]:
        """Documents of these structures (those that exist), read in batches."""
        projection = None if fields is None else dict.fromkeys(fields, 1)
        return {
            doc["_id"]: StructureDoc.model_validate(doc)
            for doc in batches.by_ids(self._c, structure_ids, projection)
        }

    def find(
        self,
        query: Mapping[str, Any] | None = None,
        fields: Iterable[str] | None = None,
        *,
        sort: str = "_id",
    ) -> Iterator[StructureDoc]:
        """Documents matching a MongoDB filter, in ``sort`` order; ``fields`` limits what is
        read (the geometry is needed for ``atoms_of``)."""
        projection = None if fields is None else dict.fromkeys(fields, 1)
        for doc in batches.find(self._c, query, projection, sort=sort):
            yield StructureDoc.model_validate(doc)

    def run_candidates(
        self, run_id: str, fields: Iterable[str] | None = None, *, system: str | None = None
    ) -> Iterator[StructureDoc]:
        """A run's candidates (of one chemical system), streamed from a cursor in no promised
        order: nothing holds every candidate of a large run at once."""
        query: dict[str, Any] = {"runs": run_id, "kind": "candidate"}
        if system is not None:
            query["chemical_system"] = system
        projection = None if fields is None else dict.fromkeys(fields, 1)
        for doc in self._c.find(query, projection, batch_size=batches.CURSOR_BATCH):
            yield StructureDoc.model_validate(doc)

    def run_systems(self, run_id: str) -> list[str]:
        """The chemical systems of a run's candidates, sorted."""
        return sorted(self._c.distinct("chemical_system", {"runs": run_id, "kind": "candidate"}))

    def run_candidate_ids(self, run_id: str, *, unscored: str | None = None) -> Iterator[str]:
        """Ids of a run's candidates (those without scores under ``unscored``), streamed."""
        query: dict[str, Any] = {"runs": run_id, "kind": "candidate"}
        if unscored is not None:
            query[f"scores.{unscored}"] = {"$exists": False}
        for doc in self._c.find(query, {"_id": 1}, batch_size=batches.CURSOR_BATCH):
            yield doc["_id"]

    def chemical_systems(self, structure_ids: Iterable[str]) -> dict[str, str]:
        return {
            d["_id"]: d["chemical_system"]
            for d in batches.by_ids(self._c, list(structure_ids), {"chemical_system": 1})
        }

    def materials_project_seeds(self, query: Mapping[str, Any]) -> list[StructureDoc]:
        """Seeds fetched before by this Materials Project query, most stable first."""
        return list(
            self.find(
                {"kind": "seed", "provenance.source.materials_project.query": dict(query)},
                sort="provenance.source.materials_project.energy_above_hull",
            )
        )

    def by_prefix(self, prefix: str, limit: int = 2) -> list[StructureDoc]:
        exact = self._c.find_one({"_id": prefix})  # a whole id: a point lookup
        if exact is not None:
            return [StructureDoc.model_validate(exact)]
        cursor = self._c.find({"_id": {"$regex": f"^{re.escape(prefix)}"}}).limit(limit)
        return [StructureDoc.model_validate(d) for d in cursor]

    def ids(self, query: Mapping[str, Any]) -> list[str]:
        return [d["_id"] for d in batches.find(self._c, query, {"_id": 1})]

    def count(self, query: Mapping[str, Any] | None = None) -> int:
        return self._c.count_documents(dict(query or {}))
