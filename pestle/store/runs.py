"""The ``runs`` collection (one document per campaign run or daemon round, with what each
stage did) and the ``decisions`` collection (what the daemon decided, and why)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from bson import ObjectId
from pymongo.collection import Collection

from pestle.store.documents import DecisionDoc, RunDoc
from pestle.store.errors import as_utc, utcnow


class RunRepository:
    def __init__(self, collection: Collection) -> None:
        self._c = collection

    def ensure_indexes(self) -> None:
        self._c.create_index("campaign")
        self._c.create_index("started_at")

    def start(self, run_id: str, record: Mapping[str, Any]) -> RunDoc:
        """Open (or reopen, when resuming) a run; what ``record`` says is kept from the first
        start. The process that runs it is recorded (``owner``), so that a reader can tell a
        run still going from one whose process was killed."""
        now = utcnow()
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self._c.update_one(
            {"_id": run_id},
            {
                "$setOnInsert": {**dict(record), "created_at": now, "stages": {}},
                "$set": {"state": "running", "started_at": now, "owner": owner},
                "$inc": {"attempts": 1},
            },
            upsert=True,
        )
        return self.require(run_id)

    def update(self, run_id: str, fields: Mapping[str, Any]) -> None:
        self._c.update_one({"_id": run_id}, {"$set": dict(fields)})

    def record_stage(self, run_id: str, stage: str, outcome: Mapping[str, Any]) -> None:
        self.update(run_id, {f"stages.{stage}": dict(outcome)})

    def get(self, run_id: str) -> RunDoc | None:
        doc = self._c.find_one({"_id": run_id})
        return None if doc is None else RunDoc.model_validate(doc)

    def require(self, run_id: str) -> RunDoc:
        from pestle.store.errors import StoreError

        doc = self.get(run_id)
        if doc is None:
            raise StoreError(f"no run {run_id}")
        return doc

    def stage(self, run_id: str, stage: str) -> dict[str, Any] | None:
        doc = self._c.find_one({"_id": run_id}, {f"stages.{stage}": 1})
        return ((doc or {}).get("stages") or {}).get(stage)

    def recent(self, limit: int = 5) -> list[RunDoc]:
        fields = {"state": 1, "started_at": 1, "report": 1, "campaign": 1, "owner": 1,
                  "config_file": 1}  # fmt: skip
        cursor = self._c.find({}, fields).sort("started_at", -1).limit(limit)
        return [RunDoc.model_validate(d) for d in cursor]

    def with_stage(self, stage: str, campaign: str | None = None) -> list[RunDoc]:
        """Runs that recorded ``stage``, oldest first."""
        query: dict[str, Any] = {f"stages.{stage}": {"$exists": True}}
        if campaign is not None:
            query["campaign"] = campaign
        return [RunDoc.model_validate(d) for d in self._c.find(query).sort("started_at", 1)]

    def count(self) -> int:
        return self._c.count_documents({})


class DecisionRepository:
    def __init__(self, collection: Collection) -> None:
        self._c = collection

    def ensure_indexes(self) -> None:
        for key in ("kind", "campaign", "at"):
            self._c.create_index(key)

    def record(self, decision: Mapping[str, Any]) -> str:
        """Keep a decision (retrain, promote or not, finish a system, withdraw) with the
        figures and reason it rests on."""
        if not decision.get("kind") or not decision.get("reason"):
            raise ValueError(f"a decision needs a kind and a reason: {dict(decision)}")
        doc = {**dict(decision), "at": utcnow()}
        return str(self._c.insert_one(doc).inserted_id)

    def find(
        self,
        kind: str | None = None,
        *,
        campaign: str | None = None,
        having: str | None = None,
        newest_first: bool = False,
        limit: int = 0,
    ) -> list[DecisionDoc]:
        query: dict[str, Any] = {}
        if kind is not None:
            query["kind"] = kind
        if campaign is not None:
            query["campaign"] = campaign
        if having is not None:
            query[having] = {"$exists": True}
        cursor = self._c.find(query).sort("at", -1 if newest_first else 1).limit(limit)
        return [
            DecisionDoc.model_validate(
                {**d, "_id": str(d["_id"]) if isinstance(d["_id"], ObjectId) else d["_id"]}
            )
            for d in cursor
        ]

    def count(self) -> int:
        return self._c.count_documents({})


def run_process_gone(run: RunDoc) -> bool:
    """A ``running`` run whose recorded process is not alive on this host (killed, or its
    machine restarted): nothing is running it. False when unknown (another host, an older
    record without an owner) or when the process lives."""
    import psutil

    owner = run.owner or {}
    if run.state != "running" or owner.get("host") != socket.gethostname():
        return False
    try:
        process = psutil.Process(int(owner["pid"]))
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return True
    started_at = as_utc(run.started_at)
    started = started_at.timestamp() if started_at else None
    # A pid reused by a later process is not the run's.
    return started is not None and process.create_time() > started + 1.0
