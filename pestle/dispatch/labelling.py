"""Labelling as Dask tasks under store leases.

The store's ``jobs`` collection, not Dask, is the source of truth: a task claims its job with
a lease, renews the lease from a heartbeat thread while the calculation runs, stores the label
and marks the job done. If a worker dies the lease lapses (at once, when the dead process was
on this host) and the driver submits the job again; if two tasks race for one job, the claim
lets only one run, and the label's unique id lets only one be stored.

The driver learns that a job ended from its task's future (the task returns the job's state);
only jobs that came back unfinished (a retry's backoff, a lease held by another driver, a
crashed worker) are looked up in the store again, every ``poll_seconds``. Each worker process
keeps one pooled client to the store for all its tasks (``pestle.store.shared_store``).
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
    from pestle.store import StoreError, label_id, shared_store, worker_name

    worker = worker_name()
    store = shared_store(store_uri, database)
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
        structure = store.structures.get(structure_id)
        if structure is None:
            raise StoreError(f"no structure {structure_id}")
        atoms = store.structures.atoms_of(structure)
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
            structure=structure,
        )
        heartbeat.stopped.set()
        finished = store.jobs.finish(
            job_id,
            worker,
            {"label_id": lid, "stored": stored, "seconds": seconds},
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

    Submits every job at once (a task whose job is not claimable says so and returns); a
    task's future reports its job's state. Jobs that come back unfinished (backing off after
    a retryable failure, held by a live lease elsewhere, their worker crashed) are looked up
    every ``poll_seconds`` and submitted again once claimable; orphaned leases of dead
    processes on this host are expired at once.
    """
    from distributed import as_completed

    progress = progress or (lambda done, total, job_id, state: None)
    total = len(set(job_ids))
    pending = set(job_ids)
    states: dict[str, str] = {}
    attempts: dict[str, int] = {}
    in_flight: dict[str, str] = {}  # task key -> job id
    waiting: set[str] = set()  # back from a task unfinished: to look up in the store
    started = time.monotonic()
    resources = cpu_resources(client, cpus_per_job)
    store.jobs.expire_orphaned_leases()
    done_tasks = as_completed(with_results=True, raise_errors=False)

    def submit(ids: list[str]) -> None:
        keys = []
        for job_id in ids:
            attempts[job_id] = attempts.get(job_id, 0) + 1
            keys.append(f"label-{job_id}-{attempts[job_id]}")
        n = len(ids)
        futures = client.map(
            run_label_job, [store_uri] * n, [store.database] * n, ids, [work_root] * n,
            [lease_seconds] * n, [job_timeout_seconds] * n,
            key=keys, pure=False, retries=0, resources=resources,
        )  # fmt: skip
        for future, job_id in zip(futures, ids, strict=True):
            in_flight[future.key] = job_id
            done_tasks.add(future)

    def settle(job_id: str, state: str) -> None:
        pending.discard(job_id)
        waiting.discard(job_id)
        states[job_id] = state
        progress(len(states), total, job_id, state)

    submit(sorted(pending))
    next_poll = time.monotonic() + poll_seconds
    while pending:
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"{len(pending)} labelling jobs unfinished: {sorted(pending)[:5]}")
        for future, result in done_tasks.next_batch(block=False):
            job_id = in_flight.pop(future.key)
            if future.status != "finished":
                # The task itself crashed (e.g. the worker was killed): its lease lapses (at
                # once if the process is gone) and the job is taken again.
                log.warning("labelling task %s errored: %r", job_id, result[1])
                waiting.add(job_id)
            elif result.get("state") in TERMINAL:
                settle(job_id, result["state"])
            elif result.get("state") == "missing":
                raise KeyError(f"labelling job {job_id} is not in the store")
            else:
                waiting.add(job_id)
        if waiting and time.monotonic() >= next_poll:
            resubmit, held_elsewhere = _look_up(store, waiting, settle)
            if resubmit:
                waiting.difference_update(resubmit)
                submit(resubmit)
            if held_elsewhere:
                store.jobs.expire_orphaned_leases()
            next_poll = time.monotonic() + poll_seconds
        if pending and not done_tasks.has_ready():
            # Woken by the next finished task, or at the latest for the next look-up.
            with done_tasks.thread_condition:
                done_tasks.thread_condition.wait(timeout=min(poll_seconds, 0.1))
    return states


def _look_up(store, waiting: set[str], settle) -> tuple[list[str], bool]:
    """Jobs that came back unfinished: settle the ended ones; returns those claimable now
    and whether some run under a live lease elsewhere."""
    docs = store.jobs.progress(waiting)
    now = datetime.now(timezone.utc)
    claimable, held_elsewhere = [], False
    for job_id in sorted(waiting):
        doc = docs.get(job_id)
        if doc is None:
            raise KeyError(f"labelling job {job_id} is not in the store")
        if doc.state in TERMINAL:
            settle(job_id, doc.state)
        elif (doc.state == "queued" and as_utc(doc.not_before) <= now) or (
            doc.state == "running" and as_utc(doc.lease_expires) < now
        ):
            claimable.append(job_id)
        elif doc.state == "running":
            held_elsewhere = True
    return claimable, held_elsewhere
