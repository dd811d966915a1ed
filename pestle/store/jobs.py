"""The ``jobs`` collection: labelling and training jobs and their lifecycle (queued, running
under a lease, done, failed, withdrawn), ``_id`` chosen by the caller so that enqueueing
twice is a no-op."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import UpdateOne
from pymongo.collection import Collection

from pestle.store import batches
from pestle.store.documents import (
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_STATES,
    JOB_WITHDRAWN,
    JobDoc,
)
from pestle.store.errors import utcnow
from pestle.store.server import pid_alive

EPOCH_MIN = datetime(1, 1, 1, tzinfo=timezone.utc)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def runs_of_campaign(campaign: str) -> dict[str, Any]:
    """Filter on ``run_id`` for every run (one-shot and daemon rounds) of a campaign, by
    the name its run ids start with (``JobRepository`` asks the runs collection instead)."""
    return {"run_id": {"$regex": f"^{re.escape(campaign)}-"}}


class JobRepository:
    def __init__(self, collection: Collection, runs: Collection | None = None) -> None:
        self._c = collection
        self._runs = runs

    def ensure_indexes(self) -> None:
        self._c.create_index([("state", 1), ("kind", 1)])
        self._c.create_index("lease_expires")
        self._c.create_index("run_id")
        self._c.create_index("finished_at")
        self._c.create_index("kind")

    def _campaign(self, campaign: str) -> dict[str, Any]:
        """Filter on ``run_id`` for every run (one-shot and daemon rounds) of a campaign:
        the runs the ``runs`` collection files under it (an index lookup; a regex on the
        run id is a collection scan on the embedded server)."""
        if self._runs is None:
            return runs_of_campaign(campaign)
        prefix = f"{campaign}-"
        ids = [d["_id"] for d in self._runs.find({"campaign": campaign}, {"_id": 1})
               if str(d["_id"]).startswith(prefix)]  # fmt: skip
        return {"run_id": {"$in": sorted(ids)}}

    # -- lifecycle ----------------------------------------------------------------------
    def enqueue(
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
        return bool(
            self.enqueue_many([(job_id, payload)], kind, run_id=run_id, max_attempts=max_attempts)
        )

    def enqueue_many(
        self,
        jobs: Iterable[tuple[str, Mapping[str, Any]]],
        kind: str,
        *,
        run_id: str | None = None,
        max_attempts: int = 3,
    ) -> list[str]:
        """``enqueue`` for many (job id, payload) pairs; returns the ids newly queued."""
        now = utcnow()
        operations, ids = [], []
        for job_id, payload in jobs:
            doc = JobDoc(
                _id=job_id, kind=kind, payload=dict(payload), state=JOB_QUEUED,
                max_attempts=max_attempts, not_before=now, run_id=run_id, created_at=now,
            ).to_mongo()  # fmt: skip
            doc.pop("_id")
            operations.append(UpdateOne({"_id": job_id}, {"$setOnInsert": doc}, upsert=True))
            ids.append(job_id)
        if not operations:
            return []
        result = self._c.bulk_write(operations, ordered=False)
        return [ids[index] for index in sorted(result.upserted_ids)]

    def claim(
        self, job_id: str, worker: str, lease_seconds: float, token: str | None = None
    ) -> JobDoc | None:
        """Atomically take a job that is queued (and due) or whose lease has expired.

        Each attempt is one conditional update of the job's document (atomic per document),
        so of several claimers exactly one matches. Not one ``findAndModify`` with an
        ``$or``: the embedded server plans both as collection scans (~0.3 s per claim at
        10⁴ jobs); these updates are ``_id`` lookups. ``token``: as ``take``'s ``claim``."""
        if not self.take(job_id, worker, lease_seconds, token):
            return None
        doc = self._c.find_one({"_id": job_id, "state": JOB_RUNNING, "worker": worker})
        return None if doc is None else JobDoc.model_validate(doc)

    def take(
        self, job_id: str, worker: str, lease_seconds: float, claim: str | None = None
    ) -> bool:
        """``claim`` without reading the job back (for a caller that read its payload
        before): True if this worker now holds the job.

        ``claim``: a token naming this take. Asked again with the same token (a store outage
        lost the first reply), a take that was applied answers True instead of finding the
        job running under a live lease."""
        now = utcnow()
        lease = now + timedelta(seconds=lease_seconds)
        update = {
            "$set": {"state": JOB_RUNNING, "worker": worker, "lease_expires": lease,
                     "started_at": now, "heartbeat_at": now, "claim": claim or uuid.uuid4().hex},
            "$inc": {"attempts": 1},
        }  # fmt: skip
        for condition in (
            {"state": JOB_QUEUED, "not_before": {"$lte": now}},
            {"state": JOB_RUNNING, "lease_expires": {"$lt": now}},
        ):
            if self._c.update_one({"_id": job_id, **condition}, update).modified_count:
                return True
        if claim is None:
            return False
        held = {"_id": job_id, "state": JOB_RUNNING, "worker": worker, "claim": claim}
        return bool(self._c.count_documents(held, limit=1))

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        now = utcnow()
        result = self._c.update_one(
            {"_id": job_id, "state": JOB_RUNNING, "worker": worker},
            {"$set": {"lease_expires": now + timedelta(seconds=lease_seconds),
                      "heartbeat_at": now}},
        )  # fmt: skip
        return result.modified_count == 1

    def take_many(
        self, job_ids: Iterable[str], worker: str, lease_seconds: float, claim: str | None = None
    ) -> set[str]:
        """``take`` for a batch of jobs (a task of cheap labels): which this worker now holds.
        Two conditional updates per slice of ids and a read of what they took: the claim's
        random token (``claim``) tells this batch's claims from any other's, even of the
        same process in the same millisecond. Asked again with the same ``claim`` (after a
        store outage), it answers what the first call took as well."""
        now = utcnow()
        token = claim or uuid.uuid4().hex
        update = {
            "$set": {"state": JOB_RUNNING, "worker": worker, "started_at": now,
                     "lease_expires": now + timedelta(seconds=lease_seconds),
                     "heartbeat_at": now, "claim": token},
            "$inc": {"attempts": 1},
        }  # fmt: skip
        held: set[str] = set()
        for part in batches.batched(dict.fromkeys(job_ids)):
            ids = {"$in": part}
            self._c.update_many({"_id": ids, "state": JOB_QUEUED, "not_before": {"$lte": now}},
                                update)  # fmt: skip
            self._c.update_many({"_id": ids, "state": JOB_RUNNING, "lease_expires": {"$lt": now}},
                                update)  # fmt: skip
            held |= {d["_id"] for d in self._c.find(
                {"_id": ids, "state": JOB_RUNNING, "claim": token}, {"_id": 1})}  # fmt: skip
        return held

    def renew_leases(self, job_ids: Iterable[str], worker: str, lease_seconds: float) -> int:
        """``renew_lease`` for a batch; returns how many this worker still holds."""
        now = utcnow()
        renewed = 0
        for part in batches.batched(dict.fromkeys(job_ids)):
            renewed += self._c.update_many(
                {"_id": {"$in": part}, "state": JOB_RUNNING, "worker": worker},
                {"$set": {"lease_expires": now + timedelta(seconds=lease_seconds),
                          "heartbeat_at": now}},
            ).modified_count  # fmt: skip
        return renewed

    def finish_many(self, results: Mapping[str, Mapping[str, Any]], worker: str) -> set[str]:
        """``finish`` for a batch, in one bulk write: the jobs this worker marked done."""
        if not results:
            return set()
        now = utcnow()
        outcome = self._c.bulk_write(
            [UpdateOne({"_id": job_id, "state": JOB_RUNNING, "worker": worker},
                       _done(result, worker, now))
             for job_id, result in results.items()],
            ordered=False,
        )  # fmt: skip
        if outcome.modified_count == len(results):
            return set(results)
        # Some lease was taken meanwhile (rare): which did this worker close?
        docs = batches.by_ids(self._c, list(results), {"state": 1, "worker": 1, "finished_at": 1})
        return {d["_id"] for d in docs
                if d.get("state") == JOB_DONE and d.get("worker") == worker
                and d.get("finished_at") is not None}  # fmt: skip

    def finish(self, job_id: str, worker: str, result: Mapping[str, Any]) -> bool:
        """Mark done; False if this worker no longer holds the job (its lease was taken)."""
        now = utcnow()
        updated = self._c.update_one(
            {"_id": job_id, "state": JOB_RUNNING, "worker": worker}, _done(result, worker, now)
        )
        return updated.modified_count == 1

    def fail(
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
        job = self._c.find_one({"_id": job_id, "state": JOB_RUNNING, "worker": worker})
        if job is None:
            return None
        now = utcnow()
        attempts = job.get("attempts", 1)
        again = retryable and attempts < job.get("max_attempts", 1)
        state = JOB_QUEUED if again else JOB_FAILED
        delay = backoff_seconds * 2 ** max(attempts - 1, 0)
        self._c.update_one(
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

    def withdraw(self, job_id: str, reason: str) -> bool:
        """Withdraw a job that is still queued (never one a worker holds); True if done."""
        now = utcnow()
        result = self._c.update_one(
            {"_id": job_id, "state": JOB_QUEUED},
            {
                "$set": {"state": JOB_WITHDRAWN, "withdrawn_reason": reason, "finished_at": now},
                "$push": {"history": {"at": now, "event": "withdrawn", "reason": reason}},
            },
        )
        return result.modified_count == 1

    def expire_orphaned_leases(self) -> int:
        """Expire the leases of running jobs whose worker process, on this host, is gone.

        A killed run leaves its jobs ``running`` until their leases lapse; a worker name is
        ``host:pid``, so on the same host a dead pid proves the lease is orphaned and the job
        can be taken over at once instead of after the lease time. Other hosts' leases are
        left to expire on their own."""
        host = socket.gethostname()
        orphaned = []
        for job in self._c.find({"state": JOB_RUNNING}, {"worker": 1}):
            name, _, pid = str(job.get("worker", "")).rpartition(":")
            if name == host and pid.isdigit() and not pid_alive(int(pid)):
                orphaned.append(job["_id"])
        for part in batches.batched(orphaned):
            self._c.update_many(
                {"_id": {"$in": part}, "state": JOB_RUNNING},
                {"$set": {"lease_expires": utcnow() - timedelta(seconds=1)}},
            )
        return len(orphaned)

    def requeue_failed(self, query: Mapping[str, Any] | None = None) -> int:
        ids = [d["_id"] for d in batches.find(self._c, {**dict(query or {}), "state": JOB_FAILED},
                                              {"_id": 1}, sort=None)]  # fmt: skip
        modified = 0
        for part in batches.batched(ids):
            now = utcnow()
            modified += self._c.update_many(
                {"_id": {"$in": part}, "state": JOB_FAILED},
                {"$set": {"state": JOB_QUEUED, "attempts": 0, "not_before": now},
                 "$push": {"history": {"at": now, "event": "requeued"}}},
            ).modified_count  # fmt: skip
        return modified

    # -- reading ------------------------------------------------------------------------
    def get(self, job_id: str) -> JobDoc | None:
        doc = self._c.find_one({"_id": job_id})
        return None if doc is None else JobDoc.model_validate(doc)

    def state(self, job_id: str) -> str | None:
        doc = self._c.find_one({"_id": job_id}, {"state": 1})
        return None if doc is None else doc["state"]

    def existing(self, job_ids: Iterable[str]) -> set[str]:
        return {d["_id"] for d in batches.by_ids(self._c, list(job_ids), {"_id": 1})}

    def states(self, job_ids: Iterable[str]) -> dict[str, str]:
        """The state of each of these jobs that exists."""
        return {d["_id"]: d["state"] for d in batches.by_ids(self._c, list(job_ids), {"state": 1})}

    def to_dispatch(self, job_ids: Iterable[str]) -> dict[str, JobDoc]:
        """``progress`` with the payload and attempts: what a task needs beside its claim."""
        fields = {"kind": 1, "state": 1, "not_before": 1, "lease_expires": 1, "worker": 1,
                  "payload": 1, "attempts": 1}  # fmt: skip
        return {
            d["_id"]: JobDoc.model_validate(d)
            for d in batches.by_ids(self._c, list(job_ids), fields)
        }

    def progress(self, job_ids: Iterable[str]) -> dict[str, JobDoc]:
        """What the driver needs to drive these jobs: state, due time, lease, worker."""
        fields = {"kind": 1, "state": 1, "not_before": 1, "lease_expires": 1, "worker": 1}
        return {
            d["_id"]: JobDoc.model_validate(d)
            for d in batches.by_ids(self._c, sorted(job_ids), fields)
        }

    def find(
        self,
        *,
        state: str | Iterable[str] | None = None,
        kind: str | None = None,
        campaign: str | None = None,
    ) -> list[JobDoc]:
        query: dict[str, Any] = {}
        if state is not None:
            query["state"] = state if isinstance(state, str) else {"$in": list(state)}
        if kind is not None:
            query["kind"] = kind
        if campaign is not None:
            query.update(self._campaign(campaign))
        return [JobDoc.model_validate(d) for d in batches.find(self._c, query)]

    def unfinished_by_run(self, campaign: str, kind: str = "label") -> dict[str, list[str]]:
        """Queued or running jobs of a campaign, per run id."""
        out: dict[str, list[str]] = defaultdict(list)
        query = {"state": {"$in": [JOB_QUEUED, JOB_RUNNING]}, "kind": kind,
                 **self._campaign(campaign)}  # fmt: skip
        for job in batches.find(self._c, query, {"run_id": 1}, sort=None):
            out[job["run_id"]].append(job["_id"])
        return {run: sorted(ids) for run, ids in sorted(out.items())}

    def counts(self, query: Mapping[str, Any] | None = None) -> dict[str, int]:
        if not query:  # every job: a count per state, each from the state index
            found = {state: self._c.count_documents({"state": state}) for state in JOB_STATES}
            return {state: n for state, n in found.items() if n}
        pipeline = [{"$match": dict(query)}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}]
        return {row["_id"]: row["n"] for row in self._c.aggregate(pipeline)}

    def finished(self) -> list[JobDoc]:
        """Jobs that ended (done, failed, withdrawn), for throughput plots."""
        fields = {"state": 1, "finished_at": 1, "error": 1, "kind": 1}
        return [
            JobDoc.model_validate(d)
            # A range, not ``$ne: None``: the embedded server serves only ranges by index.
            for d in self._c.find({"finished_at": {"$gte": EPOCH_MIN}}, fields).sort(
                "finished_at", 1
            )
        ]


def _done(result: Mapping[str, Any], worker: str, now) -> dict[str, Any]:
    """The update that marks a job done: its result in, the lease and the last failed
    attempt's error out (every attempt's error stays in the history)."""
    return {
        "$set": {"state": JOB_DONE, "result": dict(result), "finished_at": now},
        "$unset": {"lease_expires": "", "error": "", "traceback": ""},
        "$push": {"history": {"at": now, "worker": worker, "event": "done"}},
    }
