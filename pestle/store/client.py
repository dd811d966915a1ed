"""The store: every candidate, label, job, model version, run and decision, in MongoDB via
pymongo. ``Store`` holds the connection and one repository per collection; nothing outside
``pestle.store`` touches a collection directly.

Collections
- ``structures``: seeds and candidates, ``_id`` = canonical fingerprint (deduplicated).
- ``labels``: reference results, ``_id`` = ``<structure id>-<level-of-theory hash>``.
- ``jobs``: labelling/training jobs and their lifecycle, ``_id`` chosen by the caller.
- ``models``: model versions with checkpoint (GridFS), training data ids, evaluations.
- ``runs``: one document per campaign run or daemon round, with what each stage did.
- ``decisions``: the daemon's decisions and their reasons.
- ``checks``: convergence gates of labellers per system, reference equations of state.
- ``meta``: schema version, the daemon's lease and position, promoted models.
Arrays above ``INLINE_ARRAY_LIMIT`` numbers go to GridFS, so no document nears 16 MB.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import gridfs
import pymongo

from pestle.store import batches
from pestle.store.arrays import ArrayCodec
from pestle.store.checks import CheckRepository
from pestle.store.errors import StoreError, StoreUnreachable
from pestle.store.jobs import JobRepository
from pestle.store.labels import LabelRepository
from pestle.store.meta import SCHEMA, MetaRepository
from pestle.store.migrations import INDEXES_VERSION, MIGRATIONS, SCHEMA_VERSION
from pestle.store.models import ModelRepository
from pestle.store.runs import DecisionRepository, RunRepository
from pestle.store.structures import StructureRepository
from pestle.store.uri import mask_text, mask_uri

COLLECTIONS = ("structures", "labels", "jobs", "models", "runs", "decisions", "checks")


class StoreConfigError(StoreError, ValueError):
    """The URI or database name is unusable as given: bad input, not an outage."""


# A refused connection is asked again this long before it is taken for an answer.
REFUSED_GRACE_MS = 1500


def connect(uri: str, timeout_ms: int = 10_000) -> pymongo.MongoClient:
    """A client that has answered a ping. A refused connection (nothing listens on the
    port) or refused credentials fail within ``REFUSED_GRACE_MS``; a server that does not
    answer yet is waited for up to ``timeout_ms``."""
    try:
        client = pymongo.MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=timeout_ms)
    except (pymongo.errors.ConfigurationError, ValueError, TypeError) as exc:
        raise StoreConfigError(f"{mask_uri(uri)}: {mask_text(str(exc))}") from None
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        left = deadline - time.monotonic()
        try:
            with pymongo.timeout(max(min(REFUSED_GRACE_MS / 1000, left), 0.05)):
                client.admin.command("ping")
            return client
        except pymongo.errors.PyMongoError as exc:
            text = mask_text(str(exc))
            final = isinstance(exc, pymongo.errors.OperationFailure) or "refused" in text.lower()
            if final or time.monotonic() >= deadline:
                client.close()
                # Refused credentials are an answer; no answer at all is an outage.
                kind = (StoreError if isinstance(exc, pymongo.errors.OperationFailure)
                        else StoreUnreachable)  # fmt: skip
                raise kind(f"cannot reach MongoDB at {mask_uri(uri)}: {text}") from None


class Store:
    def __init__(self, uri: str, database: str = "pestle", timeout_ms: int = 10_000) -> None:
        self.uri_masked = mask_uri(uri)
        self._client: pymongo.MongoClient = connect(uri, timeout_ms)
        try:
            self._db = self._client[database]
        except (pymongo.errors.InvalidName, TypeError) as exc:
            self._client.close()
            raise StoreConfigError(f"store.database {database!r}: {exc}") from None
        fs = gridfs.GridFS(self._db)
        arrays = ArrayCodec(fs)
        self.structures = StructureRepository(self._db["structures"], arrays)
        self.labels = LabelRepository(self._db["labels"], arrays, self.structures)
        self.jobs = JobRepository(self._db["jobs"], self._db["runs"])
        self.models = ModelRepository(self._db["models"], self._db["meta"], fs)
        self.runs = RunRepository(self._db["runs"])
        self.decisions = DecisionRepository(self._db["decisions"])
        self.meta = MetaRepository(self._db["meta"])
        self.checks = CheckRepository(self._db["checks"])
        self._migrate()

    @staticmethod
    def exists(uri: str, database: str = "pestle", timeout_ms: int = 10_000) -> bool:
        """Whether ``database`` at ``uri`` holds a pestle store (a schema version in ``meta``),
        without creating or migrating anything: read-only commands ask this first."""
        client = connect(uri, timeout_ms)
        try:
            return client[database]["meta"].find_one({"_id": SCHEMA}, {"_id": 1}) is not None
        except pymongo.errors.InvalidName as exc:
            raise StoreConfigError(f"store.database {database!r}: {exc}") from None
        except pymongo.errors.PyMongoError as exc:
            raise StoreError(
                f"cannot reach MongoDB at {mask_uri(uri)}: {mask_text(str(exc))}"
            ) from None
        finally:
            client.close()

    @property
    def database(self) -> str:
        return self._db.name

    def close(self) -> None:
        self._client.close()

    def drop(self) -> None:
        """Delete this store's database (tests and benchmarks)."""
        self._client.drop_database(self._db.name)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        found, indexes = self.meta.schema_state()
        if found is not None and found > SCHEMA_VERSION:
            raise StoreError(
                f"database {self._db.name} has schema version {found}, newer than this "
                f"pestle's {SCHEMA_VERSION}: upgrade pestle"
            )
        if found == SCHEMA_VERSION and indexes >= INDEXES_VERSION:
            return
        # Indexes are created on first use of a store and whenever pestle serves a new query
        # (INDEXES_VERSION); creating an existing index is a no-op.
        for repository in (self.structures, self.labels, self.jobs, self.models, self.checks,
                           self.runs, self.decisions):  # fmt: skip
            repository.ensure_indexes()
        if found is not None:  # an older store: bring it up step by step
            for version in range(found, SCHEMA_VERSION):
                MIGRATIONS[version](self._db)
                self.meta.set_schema_version(version + 1)
        self.meta.set_schema_version(SCHEMA_VERSION)
        self.meta.set_indexes_version(INDEXES_VERSION)

    # -- what the command line asks of any collection -----------------------------------
    def query(
        self,
        collection: str,
        query: Mapping[str, Any] | None = None,
        fields: list[str] | None = None,
        *,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Raw documents of one collection (``pestle query``), in ``_id`` order."""
        if collection not in COLLECTIONS:
            raise StoreError(f"no collection {collection!r} (known: {', '.join(COLLECTIONS)})")
        projection = None if fields is None else dict.fromkeys(fields, 1)
        try:
            if limit:
                yield from (
                    self._db[collection]
                    .find(batches.flatten(query or {}), projection)
                    .sort("_id", 1)
                    .limit(limit)
                )
            else:
                yield from batches.find(self._db[collection], query, projection)
        except pymongo.errors.PyMongoError as exc:
            raise StoreError(f"the store refused the query {dict(query or {})}: {exc}") from None

    def count(self, collection: str, query: Mapping[str, Any] | None = None) -> int:
        if collection not in COLLECTIONS:
            raise StoreError(f"no collection {collection!r} (known: {', '.join(COLLECTIONS)})")
        return self._db[collection].count_documents(batches.flatten(query or {}))

    def counts(self) -> dict[str, int]:
        return {name: self._db[name].estimated_document_count() for name in COLLECTIONS[:5]}


_SHARED: dict[tuple[str, str, int], Store] = {}
_SHARED_LOCK = threading.Lock()


def shared_store(uri: str, database: str = "pestle") -> Store:
    """This process's one ``Store`` for ``uri`` and ``database``, opened on first use and kept:
    a Dask worker runs thousands of short tasks, and a new ``MongoClient`` per task (a
    connection pool, a ping and a schema check) cost more than the task's own store traffic.
    Never closed by its users; a forked child opens its own."""
    key = (uri, database, os.getpid())
    with _SHARED_LOCK:
        store = _SHARED.get(key)
        if store is None:
            store = _SHARED[key] = Store(uri, database)
        return store
