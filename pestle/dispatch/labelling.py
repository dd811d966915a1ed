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

A store outage (the server stopped and restarted, say) costs retries, not the run: the
driver's and the tasks' store calls wait for the store to come back, with backoff, for up to
``outage_seconds`` (``store.outage_seconds``) before giving up with an error naming the
outage. Each such call is safe to repeat (a claim carries its token, a job ends and a label
is stored under conditions that make a repeat a no-op); a task that gives up leaves its
jobs to the driver, which takes them again once their leases lapse.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pestle.store import JOB_TERMINAL as TERMINAL
from pestle.store.batches import batched
from pestle.store.errors import as_utc, is_store_outage
from pestle.store.retry import DEFAULT_OUTAGE_SECONDS, patiently

log = logging.getLogger("pestle.dispatch")

DEFAULT_LEASE_SECONDS = 120.0

# Jobs whose payloads and structures the driver reads (and submits) at a time.
SUBMIT_BATCH = 256
# A task of cheap labels lasts about this long (the jobs it takes at most MAX_BATCH).
BATCH_SECONDS = 0.25
MAX_BATCH = 32
# What a worker needs of a structure to label it and file the label.
STRUCTURE_FIELDS = ("geometry", "positions", "natoms", "chemical_system", "formula",
                    "provenance.sampler", "kind")  # fmt: skip

LabelProgress = Callable[[int, int, str, str], None]  # (done, total, job_id, state)


def _inside_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


class _Heartbeat(threading.Thread):
    """Renews a job's lease (or every lease of a batch still held) until stopped; notes if a
    lease was lost to someone else.

    With a time limit, a job that overruns it is recorded as a failed attempt ("timeout") and,
    on a Dask worker, the worker process exits: a calculation cannot be stopped from another
    thread, and its nanny starts a fresh worker. The job returns to the queue while attempts
    remain."""

    def __init__(
        self,
        store,
        job_id: str | list[str],
        worker: str,
        lease_seconds: float,
        timeout_seconds: float | None = None,
    ) -> None:
        ids = [job_id] if isinstance(job_id, str) else list(job_id)
        super().__init__(daemon=True, name=f"lease-{ids[0] if ids else 'none'}")
        self.store, self.worker = store, worker
        self.job_id = ids[0] if ids else ""
        self.held = set(ids)
        self.lease_seconds = lease_seconds
        self.timeout_seconds = timeout_seconds
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.lost = False
        self.timed_out = False
        self._lock = threading.Lock()
        # Asked here, in the task's thread: Dask's worker context does not reach new threads.
        self.on_dask_worker = _inside_dask_worker()

    def release(self, job_id: str) -> None:
        """Stop renewing one job's lease (it ended)."""
        with self._lock:
            self.held.discard(job_id)

    def run(self) -> None:
        beat = self.lease_seconds / 4
        if self.timeout_seconds is not None:
            beat = min(beat, max(self.timeout_seconds / 4, 0.05))
        while not self.stopped.wait(beat):
            if self.timeout_seconds and time.monotonic() - self.started > self.timeout_seconds:
                self._time_out()
                return
            with self._lock:
                held = sorted(self.held)
            try:
                if len(held) == 1:
                    renewed = self.store.jobs.renew_lease(held[0], self.worker, self.lease_seconds)
                else:
                    renewed = self.store.jobs.renew_leases(held, self.worker, self.lease_seconds)
                if renewed < len(held):
                    self.lost = True
                    if len(held) == 1:
                        return
            except Exception:  # a store hiccup: try again at the next beat
                log.warning("could not renew the lease of %s", held, exc_info=True)

    def _time_out(self) -> None:
        self.timed_out = True
        self.store.jobs.fail(
            self.job_id,
            self.worker,
            f"timeout: still running after {self.timeout_seconds:g} s",
            retryable=True,
        )
        if self.on_dask_worker:
            log.error("labelling job %s timed out: restarting this worker", self.job_id)
            os._exit(75)


def run_label_job(
    store_uri: str,
    database: str,
    job_id: str,
    work_root: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    timeout_seconds: float | None = None,
    prepared: Mapping[str, Any] | None = None,
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS,
) -> dict[str, Any]:
    """Claim, compute and store one label. Runs on a Dask worker; returns the job's state.

    ``prepared``: what the driver read for this task beside the claim (the job's ``payload``
    and ``attempts``, the ``structure`` document), so the worker's store traffic is the
    claim, the label and the job's end; without it the worker reads them itself.
    ``outage_seconds``: how long each store call waits for an unreachable store."""
    import uuid

    from pestle.labellers import LABELLERS, LabelError, level_of_theory_hash
    from pestle.store import StoreError, label_id, shared_store, worker_name
    from pestle.store.documents import StructureDoc

    patient = functools.partial(patiently, outage_seconds=outage_seconds,
                                what=f"labelling job {job_id}")  # fmt: skip

    worker = worker_name()
    store = patient(shared_store, store_uri, database)
    token = uuid.uuid4().hex  # the claim's, for its repeats: a repeat finds what it took
    if prepared is None:
        job = patient(store.jobs.claim, job_id, worker, lease_seconds, token)
        claimed = job is not None
        payload, attempted = (job.payload, job.attempts > 1) if job is not None else ({}, True)
        structure = None
    else:
        claimed = patient(store.jobs.take, job_id, worker, lease_seconds, token)
        payload, attempted = prepared["payload"], prepared["attempts"] > 0
        structure = StructureDoc.model_validate(prepared["structure"])
    if not claimed:  # done, failed, not yet due, or running under someone's live lease
        return {"job_id": job_id, "state": patient(store.jobs.state, job_id) or "missing",
                "claimed": False}  # fmt: skip
    heartbeat = _Heartbeat(store, job_id, worker, lease_seconds, timeout_seconds)
    heartbeat.start()
    try:
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
        # Only this job writes this label (both are keyed by structure and level of theory):
        # it can exist already only if an earlier attempt stored it and died before closing
        # the job. (If it came from elsewhere, the insert below still stores nothing twice.)
        if attempted and patient(store.labels.exists, lid):
            heartbeat.stopped.set()
            patient(store.jobs.finish, job_id, worker, {"label_id": lid, "stored": False})
            return {"job_id": job_id, "state": "done", "claimed": True}
        if structure is None or structure.id != structure_id:
            structure = patient(store.structures.get, structure_id)
        if structure is None:
            raise StoreError(f"no structure {structure_id}")
        atoms = patient(store.structures.atoms_of, structure)
        started = time.perf_counter()
        result = labeller.label(atoms, Path(work_root) / job_id)
        seconds = time.perf_counter() - started
        if heartbeat.timed_out:  # already recorded as a failed attempt; not a label
            return {"job_id": job_id, "state": patient(store.jobs.state, job_id),
                    "claimed": True, "error": "timeout"}  # fmt: skip
        # A label is keyed by structure and level of theory: a repeat stores nothing twice.
        stored = patient(
            store.labels.put,
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
        # Done only under this worker's lease: a repeat finds it done and answers "lost",
        # which the driver looks up.
        finished = patient(
            store.jobs.finish,
            job_id,
            worker,
            {"label_id": lid, "stored": stored, "seconds": seconds},
        )
        return {"job_id": job_id, "state": "done" if finished else "lost", "claimed": True,
                "seconds": seconds}  # fmt: skip
    except Exception as exc:
        heartbeat.stopped.set()
        if is_store_outage(exc):  # waited out: the lease lapses and the job is taken again
            raise
        # A LabelError is the calculation's verdict (e.g. no SCF convergence): running it
        # again gives the same. Anything else (a store hiccup, a killed process) may pass.
        state = patient(
            store.jobs.fail,
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
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS,
) -> dict[str, str]:
    """Drive jobs to a terminal state on the Dask cluster; returns {job_id: state}.

    The driver reads the jobs' payloads and structures in batches and submits tasks with
    them; a task's future reports its jobs' states. First one job per task, two tasks per
    worker thread; once the first of them report how long a label takes, the rest go out at
    once, one job per task when labels take longer than ``BATCH_SECONDS`` (DFT), else as
    many per task as fill about that long (a cheap labeller: the claims, label writes and
    job ends of a task are then bulk writes). Jobs that come back unfinished (backing off
    after a retryable failure, held by a live lease elsewhere, their worker crashed) are
    looked up every ``poll_seconds`` and submitted again once claimable; orphaned leases of
    dead processes on this host are expired at once.

    A store that cannot be reached is waited for, at every store call of the driver and of
    its tasks, up to ``outage_seconds`` (then a ``StoreUnreachable`` ends the labelling);
    a task that errored on an outage is looked up and its jobs taken again.
    """
    from distributed import as_completed

    patient = functools.partial(patiently, outage_seconds=outage_seconds, what="labelling")

    progress = progress or (lambda done, total, job_id, state: None)
    total = len(set(job_ids))
    pending = set(job_ids)
    queue = deque(sorted(pending))  # not yet submitted
    states: dict[str, str] = {}
    attempts: dict[str, int] = {}
    in_flight: dict[str, list[str]] = {}  # task key -> its job ids
    waiting: set[str] = set()  # back from a task unfinished: to look up in the store
    seconds: list[float] = []  # labels' compute times reported by the first tasks
    started = time.monotonic()
    resources = cpu_resources(client, cpus_per_job)
    # A time limit ends a worker process, and a multi-core job fills a worker: one per task.
    per_task: int | None = 1 if job_timeout_seconds is not None or cpus_per_job > 1 else None
    threads = max(sum(client.nthreads().values()), 1)
    patient(store.jobs.expire_orphaned_leases)
    # Results are gathered here, in this thread, not by as_completed's background tasks
    # (with_results): a gather of theirs in flight when SIGTERM closes the client ends in a
    # traceback the event loop logs; one here is simply abandoned with the run.
    done_tasks = as_completed(raise_errors=False)

    def settle(job_id: str, state: str) -> None:
        pending.discard(job_id)
        waiting.discard(job_id)
        states[job_id] = state
        progress(len(states), total, job_id, state)

    def submit(ids: list[str], size: int) -> None:
        """Tasks of ``size`` jobs, their payloads and structures read here in batches
        (ended jobs are settled, jobs not claimable now wait)."""
        for part in batched(ids, SUBMIT_BATCH):
            jobs = patient(store.jobs.to_dispatch, part)
            now = datetime.now(timezone.utc)
            ready = []
            for job_id in part:
                job = jobs.get(job_id)
                if job is None:
                    raise KeyError(f"labelling job {job_id} is not in the store")
                if job.state in TERMINAL:
                    settle(job_id, job.state)
                elif _claimable(job, now):
                    ready.append(job)
                else:
                    waiting.add(job_id)
            structures = patient(
                store.structures.raw_many,
                [job.payload["structure_id"] for job in ready],
                STRUCTURE_FIELDS,
            )
            items = []
            for job in ready:
                structure = structures.get(job.payload["structure_id"])
                items.append((job.id, None if structure is None else
                              {"payload": job.payload, "attempts": job.attempts,
                               "structure": structure}))  # fmt: skip
            singles = [item for item in items if size == 1 or item[1] is None]
            groups = list(batched([item for item in items if size > 1 and item[1] is not None],
                                  size))  # fmt: skip
            _submit_tasks(singles, groups)

    def _submit_tasks(singles: list, groups: list) -> None:
        common = (store_uri, store.database)
        if singles:
            keys = [_key(job_id) for job_id, _ in singles]
            n = len(singles)
            futures = client.map(
                run_label_job, [common[0]] * n, [common[1]] * n, [j for j, _ in singles],
                [work_root] * n, [lease_seconds] * n, [job_timeout_seconds] * n,
                [p for _, p in singles], [outage_seconds] * n, key=keys, pure=False, retries=0,
                resources=resources,
            )  # fmt: skip
            for future, (job_id, _) in zip(futures, singles, strict=True):
                in_flight[future.key] = [job_id]
                done_tasks.add(future)
        if groups:
            keys = [_key(group[0][0], len(group)) for group in groups]
            n = len(groups)
            futures = client.map(
                run_label_batch, [common[0]] * n, [common[1]] * n, [work_root] * n,
                [lease_seconds] * n, groups, [outage_seconds] * n, key=keys, pure=False,
                retries=0, resources=resources,
            )  # fmt: skip
            for future, group in zip(futures, groups, strict=True):
                in_flight[future.key] = [job_id for job_id, _ in group]
                done_tasks.add(future)

    def _key(job_id: str, size: int = 1) -> str:
        attempts[job_id] = attempts.get(job_id, 0) + 1
        return f"label-{job_id}-{attempts[job_id]}" + (f"-x{size}" if size > 1 else "")

    def submit_queue(count: int | None, size: int) -> None:
        ids = [queue.popleft() for _ in range(len(queue) if count is None else count)
               if queue]  # fmt: skip
        if ids:
            submit(ids, size)

    submit_queue(None if per_task == 1 else 2 * threads, 1)
    next_poll = time.monotonic() + poll_seconds
    while pending:
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"{len(pending)} labelling jobs unfinished: {sorted(pending)[:5]}")
        for future in done_tasks.next_batch(block=False):
            ids = in_flight.pop(future.key)
            try:
                result = future.result()
            except Exception as exc:
                # The task itself crashed (the worker was killed, the store stayed away): its
                # leases lapse (at once if the process is gone) and the jobs are taken again.
                log.warning("labelling task %s errored: %r", future.key, exc)
                waiting.update(ids)
                continue
            for job_id, outcome in zip(ids, result if isinstance(result, list) else [result],
                                       strict=True):  # fmt: skip
                if outcome.get("seconds") is not None:
                    seconds.append(outcome["seconds"])
                if outcome.get("state") in TERMINAL:
                    settle(job_id, outcome["state"])
                elif outcome.get("state") == "missing":
                    raise KeyError(f"labelling job {job_id} is not in the store")
                else:
                    waiting.add(job_id)
        if queue and per_task is None and (len(seconds) >= min(threads, 2 * threads)
                                           or not in_flight):  # fmt: skip
            per_task = batch_size(seconds)
            log.info("labels take %.3g s: %d jobs per task", min(seconds, default=0), per_task)
            submit_queue(None, per_task)
        if waiting and time.monotonic() >= next_poll:
            resubmit, held_elsewhere = _look_up(store, waiting, settle, patient)
            if resubmit:
                waiting.difference_update(resubmit)
                submit(resubmit, 1)
            if held_elsewhere:
                patient(store.jobs.expire_orphaned_leases)
            next_poll = time.monotonic() + poll_seconds
        if pending and not done_tasks.has_ready():
            # Woken by the next finished task, or at the latest for the next look-up.
            with done_tasks.thread_condition:
                done_tasks.thread_condition.wait(timeout=min(poll_seconds, 0.1))
    return states


def batch_size(seconds: Sequence[float]) -> int:
    """Jobs per task: one when a label takes ``BATCH_SECONDS`` or more (or nothing was
    measured), else enough to fill about that long, at most ``MAX_BATCH``."""
    if not seconds:
        return 1
    typical = float(np.median(seconds))
    if typical >= BATCH_SECONDS:
        return 1
    return int(min(MAX_BATCH, max(1, BATCH_SECONDS // max(typical, 1e-4))))


def run_label_batch(
    store_uri: str,
    database: str,
    work_root: str,
    lease_seconds: float,
    items: Sequence[tuple[str, Mapping[str, Any]]],
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS,
) -> list[dict[str, Any]]:
    """Several cheap labelling jobs in one task (``items``: job id and what the driver read
    for it): claimed together, their labels inserted in one write and the jobs closed in
    another, under one heartbeat renewing every lease still held. The same guarantees as
    ``run_label_job``: a job runs only under this worker's lease, a label is stored once, a
    failed job backs off or fails on its own. Returns each job's outcome, in order.
    ``outage_seconds``: how long each store call waits for an unreachable store."""
    import uuid

    from pestle.labellers import LABELLERS, LabelError, level_of_theory_hash
    from pestle.store import label_id, shared_store, worker_name
    from pestle.store.documents import StructureDoc

    patient = functools.partial(patiently, outage_seconds=outage_seconds,
                                what=f"a batch of {len(items)} labelling jobs")  # fmt: skip

    worker = worker_name()
    store = patient(shared_store, store_uri, database)
    ids = [job_id for job_id, _ in items]
    # One token for the claim and its repeats: a repeat answers what the first took.
    held = patient(store.jobs.take_many, ids, worker, lease_seconds, uuid.uuid4().hex)
    outcomes: dict[str, dict[str, Any]] = {}
    if len(held) < len(ids):
        unheld = [i for i in ids if i not in held]
        for job_id, state in patient(store.jobs.states, unheld).items():
            outcomes[job_id] = {"job_id": job_id, "state": state, "claimed": False}
    heartbeat = _Heartbeat(store, sorted(held), worker, lease_seconds)
    heartbeat.start()
    labellers: dict[str, tuple[Any, str]] = {}
    docs: list[dict[str, Any]] = []
    ends: dict[str, dict[str, Any]] = {}
    try:
        for job_id, prepared in items:
            if job_id not in held:
                continue
            try:
                payload = prepared["payload"]
                spec = payload["labeller"]
                name = json.dumps(spec, sort_keys=True, default=str)
                if name not in labellers:
                    built = LABELLERS.build(spec["name"], spec.get("params", {}))
                    labellers[name] = (built, level_of_theory_hash(built))
                labeller, lot_hash = labellers[name]
                if lot_hash != payload["lot_hash"]:
                    raise LabelError(
                        f"worker's level of theory {labeller.level_of_theory()} hashes to "
                        f"{lot_hash}, the job asked for {payload['lot_hash']}"
                    )
                structure_id = payload["structure_id"]
                lid = label_id(structure_id, lot_hash)
                if prepared["attempts"] > 0 and patient(store.labels.exists, lid):
                    ends[job_id] = {"label_id": lid, "stored": False}
                    continue
                structure = StructureDoc.model_validate(prepared["structure"])
                atoms = patient(store.structures.atoms_of, structure)
                started = time.perf_counter()
                result = labeller.label(atoms, Path(work_root) / job_id)
                took = time.perf_counter() - started
                docs.append(store.labels.document(
                    structure_id, labeller=labeller.name,
                    level_of_theory=labeller.level_of_theory(), lot_hash=lot_hash,
                    energy=result.energy, forces=result.forces, stress=result.stress,
                    job_id=job_id, role=payload.get("role"), structure=structure,
                    extra={**result.extra, "wall_seconds": round(took, 3), "worker": worker,
                           "cpus": labeller.resources().cpus},
                ))  # fmt: skip
                ends[job_id] = {"label_id": lid, "stored": True, "seconds": took}
            except Exception as exc:
                if is_store_outage(exc):  # waited out: every lease held lapses
                    raise
                heartbeat.release(job_id)
                state = patient(store.jobs.fail, job_id, worker, f"{type(exc).__name__}: {exc}",
                                traceback.format_exc(),
                                retryable=not isinstance(exc, LabelError))  # fmt: skip
                outcomes[job_id] = {"job_id": job_id, "state": state, "claimed": True,
                                    "error": str(exc)}  # fmt: skip
        # Labels are keyed by structure and level of theory, and a job ends only under this
        # worker's lease: repeats after an outage store and close nothing twice.
        stored = patient(store.labels.insert_many, docs)
        for result in ends.values():
            if result["stored"]:
                result["stored"] = result["label_id"] in stored
        heartbeat.stopped.set()
        finished = patient(store.jobs.finish_many, ends, worker)
    except Exception as exc:  # the bulk writes failed: what is still held goes back
        heartbeat.stopped.set()
        if is_store_outage(exc):  # waited out: the leases lapse and the jobs are taken again
            raise
        for job_id in held - set(outcomes):
            state = patient(store.jobs.fail, job_id, worker, f"{type(exc).__name__}: {exc}",
                            traceback.format_exc(), retryable=True)  # fmt: skip
            outcomes[job_id] = {"job_id": job_id, "state": state, "claimed": True,
                                "error": str(exc)}  # fmt: skip
        finished = set()
    finally:
        heartbeat.stopped.set()
        heartbeat.join(timeout=5)
    for job_id, result in ends.items():
        if job_id not in outcomes:
            outcomes[job_id] = {"job_id": job_id, "state": "done" if job_id in finished else "lost",
                                "claimed": True, "seconds": result.get("seconds")}  # fmt: skip
    return [outcomes.get(job_id, {"job_id": job_id, "state": None, "claimed": False})
            for job_id in ids]  # fmt: skip


def _claimable(job, now: datetime) -> bool:
    return (job.state == "queued" and as_utc(job.not_before) <= now) or (
        job.state == "running" and as_utc(job.lease_expires) < now
    )


def _look_up(store, waiting: set[str], settle, patient=None) -> tuple[list[str], bool]:
    """Jobs that came back unfinished: settle the ended ones; returns those claimable now
    and whether some run under a live lease elsewhere. ``patient``: how store calls are
    made (``patiently``, waiting out an outage)."""
    docs = (patient or (lambda call, *args: call(*args)))(store.jobs.progress, waiting)
    now = datetime.now(timezone.utc)
    claimable, held_elsewhere = [], False
    for job_id in sorted(waiting):
        doc = docs.get(job_id)
        if doc is None:
            raise KeyError(f"labelling job {job_id} is not in the store")
        if doc.state in TERMINAL:
            settle(job_id, doc.state)
        elif _claimable(doc, now):
            claimable.append(job_id)
        elif doc.state == "running":
            held_elsewhere = True
    return claimable, held_elsewhere
