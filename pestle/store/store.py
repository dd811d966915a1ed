"""The store: every candidate, label, job, model version and run, in MongoDB via pymongo.

Collections
- ``structures``: seeds and candidates, ``_id`` = canonical fingerprint (deduplicated).
- ``labels``: reference results, ``_id`` = ``<structure id>-<level-of-theory hash>``, so the same
  structure at the same level of theory is stored (and computed) once.
- ``jobs``: labelling/training jobs and their lifecycle (queued, running under a lease, done,
  failed), ``_id`` chosen by the caller so that enqueueing twice is a no-op.
- ``models``: model versions with checkpoint (GridFS), training data ids and metrics.
- ``runs``: one document per campaign run with what each stage did.
- ``meta``: the schema version.
Arrays above ``INLINE_ARRAY_LIMIT`` numbers go to GridFS, so no document nears 16 MB.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import gridfs
import numpy as np
import pymongo
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from pestle.provenance import code_versions
from pestle.store.server import pid_alive
from pestle.store.uri import mask_uri
from pestle.structures import (
    atoms_from_dict,
    atoms_to_dict,
    chemical_system,
    fingerprint,
    reduced_formula,
)

SCHEMA_VERSION = 1
# ~0.5 MB of BSON doubles; bigger arrays are written to GridFS and referenced.
INLINE_ARRAY_LIMIT = 30_000

JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED = "queued", "running", "done", "failed"
# A queued label no longer worth computing (re-scored after a promotion); never claimed.
JOB_WITHDRAWN = "withdrawn"
JOB_TERMINAL = (JOB_DONE, JOB_FAILED, JOB_WITHDRAWN)
DAEMON_LEASE = "daemon-lease"


class StoreError(RuntimeError):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def label_id(structure_id: str, lot_hash: str) -> str:
    return f"{structure_id}-{lot_hash}"


class Store:
    def __init__(self, uri: str, database: str = "pestle", timeout_ms: int = 10_000) -> None:
        self.uri_masked = mask_uri(uri)
        self.client: pymongo.MongoClient = pymongo.MongoClient(
            uri, tz_aware=True, serverSelectionTimeoutMS=timeout_ms
        )
        try:
            self.client.admin.command("ping")
        except pymongo.errors.PyMongoError as exc:
            raise StoreError(f"cannot reach MongoDB at {self.uri_masked}: {exc}") from None
        self.db = self.client[database]
        self.structures = self.db["structures"]
        self.labels = self.db["labels"]
        self.jobs = self.db["jobs"]
        self.models = self.db["models"]
        self.runs = self.db["runs"]
        self.meta = self.db["meta"]
        self.decisions = self.db["decisions"]
        self.fs = gridfs.GridFS(self.db)
        self._ensure_schema()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        found = self.meta.find_one({"_id": "schema"})
        if found is not None and found.get("version", 0) > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.db.name} has schema version {found['version']}, newer than "
                f"this pestle's {SCHEMA_VERSION}: upgrade pestle"
            )
        if found is not None and found.get("version") == SCHEMA_VERSION:
            return
        self.structures.create_index("chemical_system")
        self.structures.create_index("kind")
        self.structures.create_index("provenance.sampler")
        self.structures.create_index("provenance.parent_id")
        self.structures.create_index("runs")
        self.labels.create_index("structure_id")
        self.labels.create_index("lot_hash")
        self.labels.create_index("chemical_system")
        self.jobs.create_index([("state", 1), ("kind", 1)])
        self.jobs.create_index("lease_expires")
        self.jobs.create_index("run_id")
        self.models.create_index("family")
        self.models.create_index("created_at")
        self.meta.update_one(
            {"_id": "schema"},
            {"$set": {"version": SCHEMA_VERSION, "updated_at": utcnow()}},
            upsert=True,
        )

    # -- arrays -------------------------------------------------------------------------
    def _put_array(self, array: np.ndarray | None, name: str) -> Any:
        if array is None:
            return None
        array = np.asarray(array, dtype=float)
        if array.size <= INLINE_ARRAY_LIMIT:
            return array.tolist()
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        file_id = self.fs.put(
            buffer.getvalue(), filename=f"{name}.npy", content_type="application/x-npy"
        )
        return {"gridfs": file_id, "shape": list(array.shape)}

    def _get_array(self, value: Any) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, Mapping) and "gridfs" in value:
            data = self.fs.get(value["gridfs"]).read()
            return np.load(io.BytesIO(data), allow_pickle=False)
        return np.asarray(value, dtype=float)

    # -- structures ---------------------------------------------------------------------
    def add_structure(
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
        only adds its run id), so deduplication never rewrites history.
        """
        sid = fingerprint(atoms)
        geometry = atoms_to_dict(atoms)
        positions = geometry.pop("positions")
        doc = {
            "kind": kind,
            "name": name,
            "natoms": len(atoms),
            "formula": reduced_formula(atoms),
            "chemical_system": chemical_system(atoms),
            "elements": sorted(set(atoms.get_chemical_symbols())),
            "geometry": geometry,
            "positions": self._put_array(np.asarray(positions), f"positions-{sid}"),
            "provenance": {**provenance, "code_versions": code_versions()},
            "created_at": utcnow(),
        }
        update: dict[str, Any] = {"$setOnInsert": doc}
        if run_id is not None:
            update["$addToSet"] = {"runs": run_id}
        result = self.structures.update_one({"_id": sid}, update, upsert=True)
        return sid, result.upserted_id is not None

    def get_atoms(self, structure_id: str) -> Atoms:
        doc = self.structures.find_one({"_id": structure_id})
        if doc is None:
            raise StoreError(f"no structure {structure_id}")
        return self.atoms_from_doc(doc)

    def atoms_from_doc(self, doc: Mapping[str, Any]) -> Atoms:
        geometry = dict(doc["geometry"])
        geometry["positions"] = self._get_array(doc["positions"])
        return atoms_from_dict(geometry)

    def set_scores(self, structure_id: str, model_key: str, scores: Mapping[str, float]) -> None:
        self.structures.update_one(
            {"_id": structure_id}, {"$set": {f"scores.{model_key}": dict(scores)}}
        )

    # -- labels -------------------------------------------------------------------------
    def put_label(
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
    ) -> bool:
        """Store a label once; returns False (and stores nothing) if it already exists."""
        structure = self.structures.find_one(
            {"_id": structure_id},
            {"chemical_system": 1, "formula": 1, "natoms": 1, "provenance.sampler": 1},
        )
        if structure is None:
            raise StoreError(f"cannot label unknown structure {structure_id}")
        forces = np.asarray(forces, dtype=float)
        if forces.shape != (structure["natoms"], 3):
            raise StoreError(
                f"label for {structure_id}: forces have shape {forces.shape}, "
                f"expected ({structure['natoms']}, 3)"
            )
        lid = label_id(structure_id, lot_hash)
        if self.labels.count_documents({"_id": lid}, limit=1):
            return False
        doc = {
            "_id": lid,
            "structure_id": structure_id,
            "labeller": labeller,
            "level_of_theory": dict(level_of_theory),
            "lot_hash": lot_hash,
            "energy": float(energy),
            "energy_per_atom": float(energy) / structure["natoms"],
            "forces": self._put_array(forces, f"forces-{lid}"),
            "max_force": float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0,
            "stress": None if stress is None else np.asarray(stress, dtype=float).tolist(),
            "natoms": structure["natoms"],
            "chemical_system": structure["chemical_system"],
            "formula": structure["formula"],
            "sampler": structure.get("provenance", {}).get("sampler"),
            "job_id": job_id,
            "extra": dict(extra or {}),
            "code_versions": code_versions(),
            "created_at": utcnow(),
        }
        try:
            self.labels.insert_one(doc)
        except DuplicateKeyError:
            return False  # a duplicated task got there first: one label, never two
        return True

    def labelled_atoms(
        self, label_filter: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[Atoms, dict, dict]]:
        """(atoms with a SinglePointCalculator holding the label, structure doc, label doc)."""
        for label in self.labels.find(dict(label_filter or {})).sort("_id", 1):
            structure = self.structures.find_one({"_id": label["structure_id"]})
            atoms = self.atoms_from_doc(structure)
            stress = label.get("stress")
            atoms.calc = SinglePointCalculator(
                atoms,
                energy=label["energy"],
                forces=self._get_array(label["forces"]),
                stress=None if stress is None else np.asarray(stress),
            )
            yield atoms, structure, label

    # -- jobs ---------------------------------------------------------------------------
    def enqueue_job(
        self,
        job_id: str,
        kind: str,
        payload: Mapping[str, Any],
        *,
        run_id: str | None = None,
        max_attempts: int = 3,
    ) -> bool:
        """Queue a job unless it exists; True if newly queued. An existing job (done, failed
        or in flight) is left exactly as it is, so re-running a campaign never repeats work."""
        now = utcnow()
        result = self.jobs.update_one(
            {"_id": job_id},
            {
                "$setOnInsert": {
                    "kind": kind,
                    "payload": dict(payload),
                    "state": JOB_QUEUED,
                    "attempts": 0,
                    "max_attempts": max_attempts,
                    "not_before": now,
                    "run_id": run_id,
                    "created_at": now,
                    "history": [],
                }
            },
            upsert=True,
        )
        return result.upserted_id is not None

    def claim_job(self, job_id: str, worker: str, lease_seconds: float) -> dict | None:
        """Atomically take a job that is queued (and due) or whose lease has expired."""
        now = utcnow()
        return self.jobs.find_one_and_update(
            {
                "_id": job_id,
                "$or": [
                    {"state": JOB_QUEUED, "not_before": {"$lte": now}},
                    {"state": JOB_RUNNING, "lease_expires": {"$lt": now}},
                ],
            },
            {
                "$set": {
                    "state": JOB_RUNNING,
                    "worker": worker,
                    "lease_expires": now + timedelta(seconds=lease_seconds),
                    "started_at": now,
                    "heartbeat_at": now,
                },
                "$inc": {"attempts": 1},
            },
            return_document=pymongo.ReturnDocument.AFTER,
        )

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        now = utcnow()
        result = self.jobs.update_one(
            {"_id": job_id, "state": JOB_RUNNING, "worker": worker},
            {
                "$set": {
                    "lease_expires": now + timedelta(seconds=lease_seconds),
                    "heartbeat_at": now,
                }
            },
        )
        return result.modified_count == 1

    def finish_job(self, job_id: str, worker: str, result: Mapping[str, Any]) -> bool:
        """Mark done; False if this worker no longer holds the job (its lease was taken)."""
        now = utcnow()
        updated = self.jobs.update_one(
            {"_id": job_id, "state": JOB_RUNNING, "worker": worker},
            {
                "$set": {"state": JOB_DONE, "result": dict(result), "finished_at": now},
                "$unset": {"lease_expires": ""},
                "$push": {"history": {"at": now, "worker": worker, "event": "done"}},
            },
        )
        return updated.modified_count == 1

    def fail_job(
        self,
        job_id: str,
        worker: str,
        error: str,
        traceback_text: str = "",
        *,
        retryable: bool = True,
        backoff_seconds: float = 5.0,
    ) -> str | None:
        """Record a failed attempt: back to the queue (with exponential backoff) while attempts
        remain and the error is retryable, else ``failed``. Returns the new state."""
        job = self.jobs.find_one({"_id": job_id, "state": JOB_RUNNING, "worker": worker})
        if job is None:
            return None
        now = utcnow()
        attempts = job.get("attempts", 1)
        again = retryable and attempts < job.get("max_attempts", 1)
        state = JOB_QUEUED if again else JOB_FAILED
        delay = backoff_seconds * 2 ** max(attempts - 1, 0)
        self.jobs.update_one(
            {"_id": job_id, "worker": worker},
            {
                "$set": {
                    "state": state,
                    "error": error,
                    "traceback": traceback_text,
                    "not_before": now + timedelta(seconds=delay if again else 0),
                    "finished_at": None if again else now,
                },
                "$unset": {"lease_expires": ""},
                "$push": {
                    "history": {"at": now, "worker": worker, "event": "failed", "error": error}
                },
            },
        )
        return state

    def expire_orphaned_leases(self) -> int:
        """Expire the leases of running jobs whose worker process, on this host, is gone.

        A killed run leaves its jobs ``running`` until their leases lapse; a worker name is
        ``host:pid``, so on the same host a dead pid proves the lease is orphaned and the job
        can be taken over at once instead of after the lease time. Other hosts' leases are
        left to expire on their own.
        """
        host = socket.gethostname()
        orphaned = []
        for job in self.jobs.find({"state": JOB_RUNNING}, {"worker": 1}):
            name, _, pid = str(job.get("worker", "")).rpartition(":")
            if name == host and pid.isdigit() and not pid_alive(int(pid)):
                orphaned.append(job["_id"])
        if orphaned:
            self.jobs.update_many(
                {"_id": {"$in": orphaned}, "state": JOB_RUNNING},
                {"$set": {"lease_expires": utcnow() - timedelta(seconds=1)}},
            )
        return len(orphaned)

    def requeue_failed(self, job_filter: Mapping[str, Any] | None = None) -> int:
        result = self.jobs.update_many(
            {**dict(job_filter or {}), "state": JOB_FAILED},
            {"$set": {"state": JOB_QUEUED, "attempts": 0, "not_before": utcnow()}},
        )
        return result.modified_count

    def job_counts(self, job_filter: Mapping[str, Any] | None = None) -> dict[str, int]:
        pipeline = [
            {"$match": dict(job_filter or {})},
            {"$group": {"_id": "$state", "n": {"$sum": 1}}},
        ]
        return {row["_id"]: row["n"] for row in self.jobs.aggregate(pipeline)}

    # -- models -------------------------------------------------------------------------
    def put_model(
        self, model_id: str, checkpoint: str | os.PathLike, record: Mapping[str, Any]
    ) -> bool:
        """Store a model version with its checkpoint in GridFS; False if it already exists.

        A checkpoint folder (matgl saves one) is stored as a tar archive built with sorted
        names and zeroed times, so the same files always give the same sha256."""
        if self.models.count_documents({"_id": model_id}, limit=1):
            return False
        path = Path(checkpoint)
        payload = _folder_tar(path) if path.is_dir() else path.read_bytes()
        sha256 = hashlib.sha256(payload).hexdigest()
        file_id = self.fs.put(payload, filename=path.name, sha256=sha256)
        doc = {
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
        try:
            self.models.insert_one(doc)
        except DuplicateKeyError:
            self.fs.delete(file_id)
            return False
        return True

    def fetch_checkpoint(self, model_id: str, directory: str | os.PathLike) -> tuple[Path, str]:
        """Write a model's checkpoint (file, or folder for an archive) to ``directory`` after
        verifying its checksum; returns the path and the stored sha256."""
        doc = self.models.find_one({"_id": model_id})
        if doc is None:
            raise StoreError(f"no model {model_id}")
        info = doc["checkpoint"]
        payload = self.fs.get(info["gridfs"]).read()
        if hashlib.sha256(payload).hexdigest() != info["sha256"]:
            raise StoreError(f"checkpoint of model {model_id} fails its sha256 check")
        path = Path(directory) / f"{model_id}-{info['filename']}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if info.get("archive") == "tar":
            import shutil
            import tarfile

            if path.exists():
                shutil.rmtree(path)
            with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
                archive.extractall(path, filter="data")
        else:
            path.write_bytes(payload)
        return path, info["sha256"]

    def promote_model(self, model_id: str, reason: str) -> dict:
        """Make a model version the current one of its family (one per family); the decision
        and its reason are kept in the model's history."""
        doc = self.models.find_one({"_id": model_id}, {"family": 1})
        if doc is None:
            raise StoreError(f"no model {model_id}")
        family = doc.get("family", "unknown")
        now = utcnow()
        previous = self.meta.find_one({"_id": f"promoted:{family}"}) or {}
        self.meta.replace_one(
            {"_id": f"promoted:{family}"},
            {"model_id": model_id, "family": family, "at": now, "reason": reason,
             "previous": previous.get("model_id")},
            upsert=True,
        )  # fmt: skip
        self.models.update_one(
            {"_id": model_id},
            {"$push": {"promotions": {"at": now, "reason": reason,
                                      "replaced": previous.get("model_id")}}},
        )  # fmt: skip
        return {"family": family, "model_id": model_id, "previous": previous.get("model_id")}

    def withdraw_job(self, job_id: str, reason: str) -> bool:
        """Withdraw a job that is still queued (never one a worker holds); True if done."""
        now = utcnow()
        result = self.jobs.update_one(
            {"_id": job_id, "state": JOB_QUEUED},
            {
                "$set": {"state": JOB_WITHDRAWN, "withdrawn_reason": reason, "finished_at": now},
                "$push": {"history": {"at": now, "event": "withdrawn", "reason": reason}},
            },
        )
        return result.modified_count == 1

    def record_decision(self, decision: Mapping[str, Any]) -> str:
        """Keep a daemon decision (retrain, promote or not, withdraw) with its reason."""
        doc = {**dict(decision), "at": utcnow()}
        return str(self.decisions.insert_one(doc).inserted_id)

    # -- the daemon's lease on the store --------------------------------------------------
    def acquire_daemon_lease(
        self, owner: str, lease_seconds: float, info: Mapping[str, Any]
    ) -> dict:
        """Take the store's single daemon lease, or raise StoreError naming its holder.

        The lease is free when absent, expired, held by ``owner``, or held by a process on
        this host that no longer exists (a SIGKILLed daemon needs no wait for its lease)."""
        now = utcnow()
        held = self.meta.find_one({"_id": DAEMON_LEASE})
        if held is not None and held.get("owner") != owner:
            expires = held.get("expires_at")
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=timezone.utc)
            dead = held.get("host") == socket.gethostname() and not pid_alive(
                int(held.get("pid", 0))
            )
            if expires is not None and expires > now and not dead:
                raise StoreError(
                    f"another pestle daemon holds this store: pid {held.get('pid')} on "
                    f"{held.get('host')} (lease until {expires:%Y-%m-%d %H:%M:%S} UTC)"
                )
        fields = {**dict(info), "owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "expires_at": now + timedelta(seconds=lease_seconds), "heartbeat_at": now}  # fmt: skip
        match: dict[str, Any] = {"_id": DAEMON_LEASE}
        if held is not None:
            # Compare-and-swap on what we read: two daemons starting at once cannot both win.
            match["owner"] = held.get("owner")
            match["heartbeat_at"] = held.get("heartbeat_at")
        try:
            result = self.meta.update_one(
                match, {"$set": {**fields, "acquired_at": now}}, upsert=held is None
            )
        except DuplicateKeyError:
            result = None
        if result is None or (result.matched_count == 0 and result.upserted_id is None):
            raise StoreError("another pestle daemon took this store's lease at the same moment")
        return self.meta.find_one({"_id": DAEMON_LEASE})

    def renew_daemon_lease(self, owner: str, lease_seconds: float) -> bool:
        now = utcnow()
        result = self.meta.update_one(
            {"_id": DAEMON_LEASE, "owner": owner},
            {"$set": {"expires_at": now + timedelta(seconds=lease_seconds), "heartbeat_at": now}},
        )
        return result.matched_count == 1

    def release_daemon_lease(self, owner: str) -> None:
        self.meta.delete_one({"_id": DAEMON_LEASE, "owner": owner})

    def daemon_lease(self) -> dict | None:
        return self.meta.find_one({"_id": DAEMON_LEASE})

    def promoted_model(self, family: str) -> str | None:
        doc = self.meta.find_one({"_id": f"promoted:{family}"})
        return None if doc is None else doc["model_id"]

    # -- runs ---------------------------------------------------------------------------
    def start_run(self, run_id: str, record: Mapping[str, Any]) -> dict:
        now = utcnow()
        self.runs.update_one(
            {"_id": run_id},
            {
                "$setOnInsert": {**dict(record), "created_at": now, "stages": {}},
                "$set": {"state": "running", "started_at": now},
                "$inc": {"attempts": 1},
            },
            upsert=True,
        )
        return self.runs.find_one({"_id": run_id})

    def update_run(self, run_id: str, fields: Mapping[str, Any]) -> None:
        self.runs.update_one({"_id": run_id}, {"$set": dict(fields)})

    def get_run(self, run_id: str) -> dict | None:
        return self.runs.find_one({"_id": run_id})

    # -- queries ------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {
            name: self.db[name].estimated_document_count()
            for name in ("structures", "labels", "jobs", "models", "runs")
        }


def _folder_tar(folder: Path) -> bytes:
    """The files of ``folder`` (recursively) as an uncompressed tar, byte-identical for
    identical files: sorted names, no times, owners or modes beyond 0o644."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            info = tarfile.TarInfo(file.relative_to(folder).as_posix())
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def object_id_str(value: Any) -> Any:
    return str(value) if isinstance(value, ObjectId) else value


def iter_chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
