"""The ``models`` collection: the model registry. Each version keeps its checkpoint in GridFS
with its sha256, the labels it trained on, its parent, level of theory, hyper-parameters,
metrics, promotions and every evaluation of it (by runs, the daemon and ``pestle evaluate``)."""

from __future__ import annotations

import getpass
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gridfs
import gridfs.errors
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from pestle.provenance import code_versions
from pestle.store.documents import EvaluationRecord, ModelDoc
from pestle.store.errors import StoreError, utcnow
from pestle.store.secrets import SecretFileError
from pestle.store.signing import ModelSigner, load_signer
from pestle.structures import settings_hash

PROMOTED_PREFIX = "promoted:"

log = logging.getLogger("pestle.store.models")


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


def _key_hint() -> str:
    from pestle.store.signing import KEY_FILE_ENV, default_key_file

    return f"{default_key_file()}; set {KEY_FILE_ENV} to the key file that signed it"


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
        signature = None
        try:
            signer = load_signer(create=True)
            signature = signer.sign(model_id, record.get("potential") or record.get("family"),
                                    sha256)  # fmt: skip
        except (SecretFileError, OSError) as exc:
            # Keep the trained model; it loads only where its family needs no signature,
            # until `pestle models trust` signs it.
            log.warning("model %s stored unsigned: %s", model_id, exc)
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
                    "signature": signature,
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
        path, sha256, _, _ = self.fetch_verified(model_id, directory)
        return path, sha256

    def fetch_verified(
        self, model_id: str, directory: str | os.PathLike
    ) -> tuple[Path, str, ModelDoc, str | None]:
        """As ``fetch_checkpoint``, with the model document read once for everything: the
        path, the sha256 the written bytes have, that document, and None when its signature
        verifies under this machine's key (else why not)."""
        doc = self.require(model_id)
        info = doc.checkpoint
        if info is None:
            raise StoreError(f"model {model_id} has no checkpoint")
        payload = self._payload(model_id, info)
        # Both parts come from the store: keep them one plain name inside ``directory``.
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{model_id}-{info.filename}").lstrip(".")
        path = Path(directory) / (name or "checkpoint")
        path.parent.mkdir(parents=True, exist_ok=True)
        if info.archive == "tar":
            if path.exists():
                shutil.rmtree(path)
            with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
                archive.extractall(path, filter="data")
        else:
            path.write_bytes(payload)
        return path, info.sha256, doc, self._signature_problem(doc)

    def _payload(self, model_id: str, info) -> bytes:
        """The checkpoint's bytes, verified against the document's sha256."""
        try:
            payload = self._fs.get(info.gridfs).read()
        except gridfs.errors.GridFSError as exc:
            raise StoreError(
                f"the checkpoint of model {model_id} is missing or incomplete in the store "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if hashlib.sha256(payload).hexdigest() != info.sha256:
            raise StoreError(f"checkpoint of model {model_id} fails its sha256 check")
        return payload

    # -- signatures ---------------------------------------------------------------------
    def signature_problem(self, model_id: str) -> str | None:
        """None when the checkpoint's signature verifies under this machine's key, else why
        not (unsigned, another key, changed, no key here)."""
        return self._signature_problem(self.require(model_id))

    def _signature_problem(self, doc: ModelDoc) -> str | None:
        if doc.checkpoint is None:
            return "it has no checkpoint"
        if not doc.checkpoint.signature:
            return "it is not signed"
        try:
            signer = load_signer()
        except SecretFileError as exc:
            return f"the signing key is unusable: {exc}"
        if signer is None:
            return f"there is no signing key here to verify it (expected {_key_hint()})"
        return signer.verify(doc.id, doc.potential or doc.family, doc.checkpoint.sha256,
                             doc.checkpoint.signature)  # fmt: skip

    def trust(self, model_id: str, note: str = "") -> dict[str, Any]:
        """Sign a model's checkpoint with this machine's key: the explicit, recorded way to
        accept one that is unsigned or signed elsewhere. Returns what was recorded."""
        doc = self.require(model_id)
        if doc.checkpoint is None:
            raise StoreError(f"model {model_id} has no checkpoint to trust")
        self._payload(model_id, doc.checkpoint)  # the bytes are the ones the sha256 names
        try:
            signer: ModelSigner = load_signer(create=True)
        except (SecretFileError, OSError) as exc:
            raise StoreError(f"cannot sign model {model_id}: {exc}") from None
        signature = signer.sign(model_id, doc.potential or doc.family, doc.checkpoint.sha256)
        record = {
            "at": utcnow(),
            "by": f"{getpass.getuser()}@{socket.gethostname()}",
            "key": signer.fingerprint,
            "sha256": doc.checkpoint.sha256,
            "previous_signature": doc.checkpoint.signature,
            "note": note,
        }
        self._c.update_one(
            {"_id": model_id, "checkpoint.sha256": doc.checkpoint.sha256},
            {"$set": {"checkpoint.signature": signature}, "$push": {"trusted": record}},
        )
        log.warning("model %s (sha256 %s) trusted by %s with key %s", model_id,
                    doc.checkpoint.sha256, record["by"], signer.fingerprint)  # fmt: skip
        return record

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
