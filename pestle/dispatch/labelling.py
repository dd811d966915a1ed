"""Labelling as Dask tasks under store leases.

The store's ``jobs`` collection, not Dask, is the source of truth: a task claims its job with
a lease, renews the lease from a heartbeat thread while the calculation runs, stores the label
and marks the job done. If a worker dies the lease lapses (at once, when the dead process was
on this host) and the driver submits the job again; if two tasks race for one job, the claim
lets only one run, and the label's unique id lets only one be stored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pestle.store import JOB_TERMINAL as TERMINAL
from pestle.store.errors import as_utc

log = logging.getLogger("pestle.dispatch")

DEFAULT_LEASE_SECONDS = 120.0

LabelProgress = Callable[[int, int, str, str], None]  # (done, total, job_id, state)


def _inside_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


class _Heartbeat(threading.Thread):
    """Renews a job's lease until stopped; notes if the lease was lost to someone else.

    With a time limit, a job that overruns it is recorded as a failed attempt ("timeout") and,
    on a Dask worker, the worker process exits: a calculation cannot be stopped from another
    thread, and its nanny starts a fresh worker. The job returns to the queue while attempts
    remain."""

    def __init__(
        self,
        store,
        job_id: str,
        worker: str,
        lease_seconds: float,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.store, self.job_id, self.worker = store, job_id, worker
        self.lease_seconds = lease_seconds
        self.timeout_seconds = timeout_seconds
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.lost = False
        self.timed_out = False

    def run(self) -> None:
        beat = self.lease_seconds / 4
        if self.timeout_seconds is not None:
            beat = min(beat, max(self.timeout_seconds / 4, 0.05))
        while not self.stopped.wait(beat):
            if self.timeout_seconds and time.monotonic() - self.started > self.timeout_seconds:
                self._time_out()
                return
            try:
                if not self.store.jobs.renew_lease(self.job_id, self.worker, self.lease_seconds):
                    self.lost = True
                    return
            except Exception:  # a store hiccup: try again at the next beat
                log.warning("could not renew the lease of %s", self.job_id, exc_info=True)

    def _time_out(self) -> None:
        self.timed_out = True
        self.store.jobs.fail(
            self.job_id,
            self.worker,
            f"timeout: still running after {self.timeout_seconds:g} s",
            retryable=True,
        )
        if _inside_dask_worker():
            log.error("labelling job %s timed out: restarting this worker", self.job_id)
            os._exit(75)


def run_label_job(
    store_uri: str,
    database: str,
    job_id: str,
    work_root: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Claim, compute and store one label. Runs on a Dask worker; returns the job's state."""
    from pestle.labellers import LABELLERS, LabelError, level_of_theory_hash
    from pestle.store import Store, label_id, worker_name

    worker = worker_name()
    with Store(store_uri, database) as store:
        job = store.jobs.claim(job_id, worker, lease_seconds)
        if job is None:  # done, failed, not yet due, or running under someone's live lease
            return {"job_id": job_id, "state": store.jobs.state(job_id) or "missing",
                    "claimed": False}  # fmt: skip
        heartbeat = _Heartbeat(store, job_id, worker, lease_seconds, timeout_seconds)
        heartbeat.start()
        try:
            payload = job.payload
            spec = payload["labeller"]
            labeller = LABELLERS.build(spec["name"], spec.get("params", {}))
            lot_hash = level_of_theory_hash(labeller)
            if lot_hash != payload["lot_hash"]:
                # Another code version or setup set on this worker: the label would be filed
                # under a level of theory it was not computed at.
                raise LabelError(
                    f"worker's level of theory {labeller.level_of_theory()} hashes to "
                    f"{lot_hash}, the job asked for {payload['lot_hash']}"
                )
            structure_id = payload["structure_id"]
            lid = label_id(structure_id, lot_hash)
            if store.labels.exists(lid):
                # A previous attempt stored the label and died before closing the job.
                heartbeat.stopped.set()
                store.jobs.finish(job_id, worker, {"label_id": lid, "stored": False})
                return {"job_id": job_id, "state": "done", "claimed": True}
            atoms = store.structures.atoms(structure_id)
            started = time.perf_counter()
            result = labeller.label(atoms, Path(work_root) / job_id)
            seconds = time.perf_counter() - started
            if heartbeat.timed_out:  # already recorded as a failed attempt; not a label
                return {"job_id": job_id, "state": store.jobs.state(job_id), "claimed": True,
                        "error": "timeout"}  # fmt: skip
            stored = store.labels.put(
                structure_id,
                labeller=labeller.name,
                level_of_theory=labeller.level_of_theory(),
                lot_hash=lot_hash,
                energy=result.energy,
                forces=result.forces,
                stress=result.stress,
                job_id=job_id,
                extra={
                    **result.extra,
                    "wall_seconds": round(seconds, 3),
                    "worker": worker,
                    "cpus": labeller.resources().cpus,
                },  # fmt: skip
                role=payload.get("role"),
            )
            heartbeat.stopped.set()
            finished = store.jobs.finish(
                job_id,
                worker,
                {
                    "label_id": label_id(structure_id, lot_hash),
                    "stored": stored,
                    "seconds": seconds,
                },
            )
            return {"job_id": job_id, "state": "done" if finished else "lost", "claimed": True}
        except Exception as exc:
            heartbeat.stopped.set()
            # A LabelError is the calculation's verdict (e.g. no SCF convergence): running it
            # again gives the same. Anything else (a store hiccup, a killed process) may pass.
            state = store.jobs.fail(
                job_id,
                worker,
                f"{type(exc).__name__}: {exc}",
                traceback.format_exc(),
                retryable=not isinstance(exc, LabelError),
            )
            return {"job_id": job_id, "state": state, "claimed": True, "error": str(exc)}
        finally:
            heartbeat.stopped.set()
            heartbeat.join(timeout=5)


def cpu_resources(client, need: int) -> dict[str, int] | None:
    """The Dask resources a labelling task asks for: ``CPU: need`` when the workers declare
    CPU resources (pestle's own clusters do), nothing on a cluster that declares none."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    offered = [(w.get("resources") or {}).get("CPU") for w in workers.values()]
    if all(o is None for o in offered):
        if need > 1:
            log.warning("workers declare no CPU resources: %d-core jobs may share cores", need)
        return None
    most = max(o or 0 for o in offered)
    if most < need:
        raise ValueError(
            f"a labelling job needs {need} cores but no Dask worker offers more than {most:g}: "
            "raise dask.threads_per_worker or lower labeller.params.parallel_ranks"
        )
    return {"CPU": need}


def label_jobs(
    client,
    store,
    job_ids: Sequence[str],
    *,
    store_uri: str,
    work_root: str,
    progress: LabelProgress | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    poll_seconds: float = 0.5,
    timeout_seconds: float | None = None,
    job_timeout_seconds: float | None = None,
    cpus_per_job: int = 1,
) -> dict[str, str]:
    """Drive jobs to a terminal state on the Dask cluster; returns {job_id: state}.

    Submits every job that is claimable (queued and due, or whose lease lapsed), waits for jobs
    held by live leases (another driver's workers, say), and resubmits jobs that come back to
    the queue after a retryable failure or a dead worker.
    """
    progress = progress or (lambda done, total, job_id, state: None)
    pending = set(job_ids)
    states: dict[str, str] = {}
    in_flight: dict[str, Any] = {}  # job id -> future
    attempts: dict[str, int] = {}
    started = time.monotonic()
    resources = cpu_resources(client, cpus_per_job)
    store.jobs.expire_orphaned_leases()
    while pending:
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"{len(pending)} labelling jobs unfinished: {sorted(pending)[:5]}")
        for job_id, future in list(in_flight.items()):
            if future.done():
                del in_flight[job_id]
                if future.status == "error":
                    # The task itself crashed (e.g. the worker was killed): the lease will
                    # lapse and the job be taken again below.
                    log.warning("labelling task %s errored: %r", job_id, future.exception())
        now = datetime.now(timezone.utc)
        docs = store.jobs.progress(pending)
        held_elsewhere = False
        for job_id in sorted(pending):
            doc = docs.get(job_id)
            if doc is None:
                raise KeyError(f"labelling job {job_id} is not in the store")
            state = doc.state
            if state in TERMINAL:
                pending.discard(job_id)
                states[job_id] = state
                progress(len(states), len(job_ids), job_id, state)
                continue
            if job_id in in_flight:
                continue
            claimable = (state == "queued" and as_utc(doc.not_before) <= now) or (
                state == "running" and as_utc(doc.lease_expires) < now
            )
            if state == "running" and not claimable:
                held_elsewhere = True
            if claimable:
                attempts[job_id] = attempts.get(job_id, 0) + 1
                in_flight[job_id] = client.submit(
                    run_label_job,
                    store_uri,
                    store.database,
                    job_id,
                    work_root,
                    lease_seconds,
                    job_timeout_seconds,
                    key=f"label-{job_id}-{attempts[job_id]}",
                    pure=False,
                    retries=0,
                    resources=resources,
                )
        if held_elsewhere:
            store.jobs.expire_orphaned_leases()
        if pending:
            time.sleep(poll_seconds)
    return states
