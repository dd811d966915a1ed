"""The score stage: the scoring potential's forces and energies for every candidate of the
run (committee spread and descriptors when configured), stored under the identity of what
scored them, so a rerun with the same models recomputes nothing.

Candidates are scored in batches of ``CHUNK`` (in id order, so the committee's per-batch
energy references do not depend on where a batch ran), either in this process or as Dask
tasks on the workers, each worker loading the models once (``pestle.dispatch.scoring``).
``dask.score_on: auto`` scores on the workers on a remote or GPU cluster; on the local
cluster it measures both on the run's first batches and scores the rest where it was faster.
Only ids are held for the whole run, never the candidates' documents.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pestle.scoring import force_scores, score_batch

if TYPE_CHECKING:
    from pestle.stages.context import RunContext

__all__ = ["CHUNK", "ScoreStage", "force_scores"]

# Candidates per batch: bounds memory; the potential bounds each forward pass.
CHUNK = 32
# Batches per worker task.
PER_TASK = 2


def model_refs(ctx: RunContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a worker builds: the scoring model (a stored version by id) and the committee."""
    model_id = ctx.scoring_model or (ctx.round.model_id if ctx.round else None)
    main = (
        {"model_id": model_id}
        if model_id is not None
        else {"name": ctx.config.potential.name, "params": dict(ctx.config.potential.params)}
    )
    committee = [{"name": s.name, "params": dict(s.params)} for s in ctx.config.scoring.committee]
    return main, committee


class ScoreStage:
    name = "score"
    requires = ("sampled",)
    provides = ("scored",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        key = ctx.model_key
        scoring = ctx.config.scoring
        potential = ctx.potential
        if scoring.embeddings and not potential.supports_embeddings:
            raise ValueError(f"scoring.embeddings: potential {potential.name} has no embeddings")
        ids = sorted(ctx.store.structures.run_candidate_ids(ctx.run_id, unscored=key))
        chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
        total = len(ids)
        self.done = 0

        def advance(count: int) -> None:
            self.done += count
            ctx.progress("score", self.done, total)

        placement = Placement(ctx, key)
        placement.run(chunks, advance)
        outcome = {
            "model": potential.describe(),
            "committee": [m.describe() for m in ctx.committee],
            "model_key": key,
            "scored": total,
            "placement": placement.record(),
        }
        ctx.record("score", outcome)
        return {"scored": outcome}


class Placement:
    """Where the batches are scored: in this process or on the Dask workers, as configured
    (``dask.score_on``) or, with ``auto`` on the local cluster, as measured on the first
    batches (two in this process, then two rounds of one task per worker thread)."""

    def __init__(self, ctx: RunContext, key: str) -> None:
        self.ctx, self.key = ctx, key
        self.choice = ctx.config.dask.score_on
        self.where: str | None = None
        self.measured: dict[str, float] = {}
        self.reason = ""

    def record(self) -> dict[str, Any]:
        return {"on": self.where, "configured": self.choice, "reason": self.reason,
                **{k: round(v, 6) for k, v in self.measured.items()}}  # fmt: skip

    # -- the two ways ---------------------------------------------------------------------
    def in_driver(self, chunks: list[list[str]], advance) -> None:
        from pestle.dispatch.scoring import score_and_store

        ctx = self.ctx
        for ids in chunks:
            count = score_and_store(ctx.store, ids, ctx.potential, ctx.committee, self.key,
                                    ctx.config.scoring.embeddings, score_batch,
                                    pressure=ctx.config.scoring.pressure)  # fmt: skip
            advance(count)

    def on_workers(self, chunks: list[list[str]], advance, per_task: int = PER_TASK) -> None:
        from pestle.dispatch.scoring import score_on_workers

        ctx = self.ctx
        main, committee = model_refs(ctx)
        score_on_workers(ctx.client, ctx.store_uri, ctx.store.database, chunks, main, committee,
                         self.key, ctx.config.scoring.embeddings,
                         pressure=ctx.config.scoring.pressure, per_task=per_task,
                         progress=advance)  # fmt: skip

    # -- the choice -----------------------------------------------------------------------
    def run(self, chunks: list[list[str]], advance) -> None:
        from pestle.dispatch.scoring import scoring_resources, worker_threads

        ctx = self.ctx
        if not chunks:
            self.where, self.reason = "driver", "nothing to score"
            return
        if ctx.client is None or self.choice == "driver":
            self.where = "driver"
            self.reason = "configured" if self.choice == "driver" else "no Dask cluster"
            self.in_driver(chunks, advance)
            return
        gpu = scoring_resources(ctx.client) is not None
        local = ctx.config.dask.scheduler_address is None and ctx.config.dask.jobqueue is None
        if self.choice == "workers" or gpu or not local:
            self.where = "workers"
            self.reason = ("configured" if self.choice == "workers"
                           else "workers with a GPU" if gpu else "a remote cluster")  # fmt: skip
            self.on_workers(chunks, advance)
            return
        threads = max(worker_threads(ctx.client), 1)
        probe = 2 + 2 * threads  # batches the measurement scores
        if len(chunks) < 2 * probe:
            self.where, self.reason = "driver", "too few batches to measure"
            self.in_driver(chunks, advance)
            return
        self.in_driver(chunks[:1], advance)  # loads the model
        started = time.perf_counter()
        self.in_driver(chunks[1:2], advance)
        driver = (time.perf_counter() - started) / len(chunks[1])
        self.on_workers(chunks[2 : 2 + threads], advance, per_task=1)  # loads the models
        second = chunks[2 + threads : probe]
        started = time.perf_counter()
        self.on_workers(second, advance, per_task=1)
        workers = (time.perf_counter() - started) / sum(len(c) for c in second)
        self.measured = {"driver_seconds_per_candidate": driver,
                         "workers_seconds_per_candidate": workers}  # fmt: skip
        rest = chunks[probe:]
        if workers < driver:
            self.where = "workers"
            self.reason = f"measured: {threads} worker threads faster than this process"
            self.on_workers(rest, advance)
        else:
            self.where = "driver"
            self.reason = f"measured: this process faster than {threads} worker threads"
            self.in_driver(rest, advance)
