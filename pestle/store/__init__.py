"""The store: MongoDB through pymongo (embedded local server by default), one repository per
collection (see ``client.Store``), typed documents (``documents``), migrations."""

from __future__ import annotations

import os
from pathlib import Path

from pestle.store.client import COLLECTIONS, Store, shared_store
from pestle.store.documents import (
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_STATES,
    JOB_TERMINAL,
    JOB_WITHDRAWN,
    ROLE_CHECK,
    ROLE_EVALUATION,
    ROLE_HOLDOUT,
    ROLE_TRAIN,
    ROLE_VALIDATION,
    ROLES,
)
from pestle.store.errors import StoreError
from pestle.store.jobs import worker_name
from pestle.store.labels import StoredLabel, label_id
from pestle.store.server import EmbeddedServer
from pestle.store.structures import NewStructure
from pestle.store.uri import configured_uri, embedded_uri, mask_uri

__all__ = [
    "COLLECTIONS",
    "JOB_DONE",
    "JOB_FAILED",
    "JOB_QUEUED",
    "JOB_RUNNING",
    "JOB_STATES",
    "JOB_TERMINAL",
    "JOB_WITHDRAWN",
    "ROLES",
    "ROLE_CHECK",
    "ROLE_EVALUATION",
    "ROLE_HOLDOUT",
    "ROLE_TRAIN",
    "ROLE_VALIDATION",
    "EmbeddedServer",
    "NewStructure",
    "Store",
    "StoreError",
    "StoredLabel",
    "configured_uri",
    "embedded_uri",
    "label_id",
    "mask_uri",
    "open_store",
    "resolve_uri",
    "shared_store",
    "worker_name",
]


def resolve_uri(
    work_dir: str | os.PathLike,
    uri: str | None = None,
    uri_file: str | os.PathLike | None = None,
    start: bool = True,
) -> str:
    """The configured MongoDB URI, else the embedded server's (started if ``start``)."""
    found = configured_uri(uri, uri_file)
    if found:
        return found
    server = EmbeddedServer(work_dir)
    state = server.ensure_running() if start else server.state()
    if state is None:
        raise StoreError(f"no pestle store is running for {Path(work_dir)} (pestle db start)")
    return embedded_uri(state.uri)


def open_store(
    work_dir: str | os.PathLike,
    uri: str | None = None,
    uri_file: str | os.PathLike | None = None,
    database: str = "pestle",
    start: bool = True,
) -> Store:
    return Store(resolve_uri(work_dir, uri, uri_file, start=start), database)
