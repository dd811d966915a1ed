"""The ``models`` collection: the model registry. Each version keeps its checkpoint in GridFS
with its sha256, the labels it trained on, its parent, level of theory, hyper-parameters,
metrics, promotions and every evaluation of it (by runs, the daemon and ``pestle evaluate``)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gridfs
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from pestle.provenance import code_versions
from pestle.store.documents import EvaluationRecord, ModelDoc
from pestle.store.errors import StoreError, utcnow
from pestle.structures import settings_hash

PROMOTED_PREFIX = "promoted:"


def folder_tar(folder: Path) -> bytes:
    """The files of ``folder`` (recursively) as an uncompressed tar, byte-identical for
    identical files: sorted names, no times, owners or modes beyond 0o644."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            info = tarfile.TarInfo(file.relative_to(folder).as_posix())
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class ModelRepository:
    def __init__(self, collection: Collection, meta: Collection, fs: gridfs.GridFS) -> None:
        self._c = collection
        self._meta = meta
        self._fs = fs

    def ensure_indexes(self) -> None:
        self._c.create_index("family")
        self._c.create_index("created_at")

    def put(self, model_id: str, checkpoint: str | os.PathLike, record: Mapping[str, Any]) -> bool:
        """Store a model version with its checkpoint in GridFS; False if it already exists.

        A checkpoint folder (matgl saves one) is stored as a tar archive built with sorted
        names and zeroed times, so the same files always give the same sha256."""
        if self.exists(model_id):
            return False
        path = Path(checkpoint)
        payload = folder_tar(path) if path.is_dir() else path.read_bytes()
        sha256 = hashlib.sha256(payload).hexdigest()
        file_id = self._fs.put(payload, filename=path.name, sha256=sha256)
        doc = ModelDoc.model_validate(
            {
                **dict(record),
                "_id": model_id,
                "checkpoint": {
                    "gridfs": file_id,
                    "filename": path.name,
                    "archive": "tar" if path.is_dir() else None,
                    "sha256": sha256,
                    "bytes": len(payload),
                },
                "code_versions": code_versions(),
                "created_at": utcnow(),
            }
        ).to_mongo()
        try:
            self._c.insert_one(doc)
        except DuplicateKeyError:
            self._fs.delete(file_id)
            return False
        return True

    def exists(self, model_id: str) -> bool:
        return bool(self._c.count_documents({"_id": model_id}, limit=1))

    def get(self, model_id: str) -> ModelDoc | None:
        doc = self._c.find_one({"_id": model_id})
        return None if doc is None else ModelDoc.model_validate(doc)

    def require(self, model_id: str) -> ModelDoc:
        doc = self.get(model_id)
        if doc is None:
            raise StoreError(f"no model {model_id} in the store (see `pestle models`)")
        return doc

    def all(self) -> list[ModelDoc]:
        return [ModelDoc.model_validate(d) for d in self._c.find({}).sort("created_at", 1)]

    def fetch_checkpoint(self, model_id: str, directory: str | os.PathLike) -> tuple[Path, str]:
        """Write a model's checkpoint (file, or folder for an archive) to ``directory`` after
        verifying its checksum; returns the path and the stored sha256."""
        info = self.require(model_id).checkpoint
        if info is None:
            raise StoreError(f"model {model_id} has no checkpoint")
        payload = self._fs.get(info.gridfs).read()
        if hashlib.sha256(payload).hexdigest() != info.sha256:
            raise StoreError(f"checkpoint of model {model_id} fails its sha256 check")
        path = Path(directory) / f"{model_id}-{info.filename}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if info.archive == "tar":
            if path.exists():
                shutil.rmtree(path)
            with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
                archive.extractall(path, filter="data")
        else:
            path.write_bytes(payload)
        return path, info.sha256

    # -- evaluations --------------------------------------------------------------------
    def record_evaluation(
        self, model_id: str, source: str, label_ids: Sequence[str], metrics: Mapping[str, Any]
    ) -> EvaluationRecord:
        """Keep one evaluation of a model on a set of labels; the same source on the same
        labels replaces its earlier record."""
        digest = settings_hash({"labels": sorted(label_ids)})
        record = EvaluationRecord(
            key=f"{source}-{digest[:10]}",
            source=source,
            label_ids_hash=digest,
            n_labels=len(label_ids),
            metrics=dict(metrics),
            at=utcnow(),
        )
        self._c.update_one({"_id": model_id}, {"$pull": {"evaluations": {"key": record.key}}})
        self._c.update_one({"_id": model_id}, {"$push": {"evaluations": record.model_dump()}})
        return record

    # -- promotion ----------------------------------------------------------------------
    def promote(self, model_id: str, reason: str) -> dict[str, Any]:
        """Make a model version the current one of its family (one per family); the decision
        and its reason are kept in the model's history."""
        family = self.require(model_id).family
        now = utcnow()
        previous = self.promoted(family)
        self._meta.replace_one(
            {"_id": PROMOTED_PREFIX + family},
            {"model_id": model_id, "family": family, "at": now, "reason": reason,
             "previous": previous},
            upsert=True,
        )  # fmt: skip
        self._c.update_one(
            {"_id": model_id},
            {"$push": {"promotions": {"at": now, "reason": reason, "replaced": previous}}},
        )
        return {"family": family, "model_id": model_id, "previous": previous}

    def promoted(self, family: str) -> str | None:
        doc = self._meta.find_one({"_id": PROMOTED_PREFIX + family})
        return None if doc is None else doc["model_id"]

    def promoted_all(self) -> list[dict[str, Any]]:
        """Every family's current model: family, model id, when and why."""
        return [
            {k: v for k, v in doc.items() if k != "_id"}
            for doc in self._meta.find({"_id": {"$regex": f"^{PROMOTED_PREFIX}"}}).sort("_id", 1)
        ]

    def count(self) -> int:
        return self._c.count_documents({})
