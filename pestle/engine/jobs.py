"""Looking at and re-queueing jobs (``pestle jobs show``, ``pestle jobs retry``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pestle.store import JOB_FAILED, Store, StoreError
from pestle.store.documents import JobDoc


def find_job(store: Store, job_id: str) -> JobDoc:
    """A job by its id or a unique prefix of it; StoreError naming the matches otherwise."""
    job = store.jobs.get(job_id)
    if job is not None:
        return job
    prefix = {"_id": {"$regex": "^" + re.escape(job_id)}}
    matches = [d["_id"] for d in store.query("jobs", prefix, ["_id"], limit=4)]
    if len(matches) == 1:
        return store.jobs.get(matches[0])
    if not matches:
        raise StoreError(f"no job {job_id!r} (see `pestle jobs`)")
    shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
    raise StoreError(f"{job_id!r} matches several jobs ({shown}): give more characters")


def retry_jobs(store: Store, job_ids: Sequence[str]) -> list[str]:
    """Re-queue these failed jobs (ids or unique prefixes), all or none: a job that is not
    failed (or not found) is an error and nothing changes. Returns the full ids."""
    jobs = [find_job(store, job_id) for job_id in job_ids]
    refused = [f"{job.id} is {job.state}" for job in jobs if job.state != JOB_FAILED]
    if refused:
        raise StoreError(
            "; ".join(refused) + ": only failed jobs are re-queued (nothing was changed)"
        )
    ids = sorted({job.id for job in jobs})
    store.jobs.requeue_failed({"_id": {"$in": ids}})
    return ids


def retry_failed(store: Store) -> int:
    """Re-queue every failed job; returns how many."""
    return store.jobs.requeue_failed()
