"""Schema versions of the store and the migrations between them, applied by pestle itself
when it opens an older store (each step runs once; the version is recorded in ``meta``).

1. The original layout.
2. Evaluations of a model live in one list, ``models.evaluations`` (one record per source and
   label set); version 1 kept them as ``evaluation.<key>`` (runs, daemon) and flat
   ``evaluation_cli-<hash>`` fields (``pestle evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable

from pymongo.database import Database

from pestle.store.errors import utcnow

SCHEMA_VERSION = 2
# The indexes every repository creates (``ensure_indexes``): raised when pestle issues a query
# that needs a new one, so an existing store gets it the next time it is opened. Indexes
# change no document, so this is no schema version (``meta``'s schema document records both).
INDEXES_VERSION = 1


def _evaluations_in_one_list(db: Database) -> None:
    models = db["models"]
    for doc in models.find({}):
        records = list(doc.get("evaluations") or [])
        unset: dict[str, str] = {}
        for key, metrics in (doc.get("evaluation") or {}).items():
            source = "daemon" if key.startswith("daemon-") else key
            records.append(_record(f"{key}", source, metrics))
            unset["evaluation"] = ""
        for field, metrics in doc.items():
            if field.startswith("evaluation_cli-"):
                records.append(_record(field.removeprefix("evaluation_"), "cli", metrics))
                unset[field] = ""
        if unset:
            models.update_one(
                {"_id": doc["_id"]}, {"$set": {"evaluations": records}, "$unset": unset}
            )


def _record(key: str, source: str, metrics: dict) -> dict:
    # Version 1 did not keep which labels an evaluation used beyond its key's hash.
    return {"key": key, "source": source, "label_ids_hash": key.rpartition("-")[2],
            "n_labels": 0, "metrics": metrics, "at": utcnow(), "migrated_from": 1}  # fmt: skip


# MIGRATIONS[n] brings a store from version n to n + 1.
MIGRATIONS: dict[int, Callable[[Database], None]] = {1: _evaluations_in_one_list}
