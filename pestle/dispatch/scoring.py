"""Scoring as Dask tasks over chunks of candidates.

A task reads its candidates' geometry from the store, predicts with the main potential (and
the committee, and the descriptors when asked) and writes the scores back: only ids travel
through the scheduler. Each worker process loads a model once and keeps it for every later
chunk (``model_for``); a stored model version is fetched from the store's registry by the
worker itself. On a cluster whose workers offer a GPU the tasks ask for one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("pestle.dispatch")

# A model reference a worker can build: {"name": ..., "params": {...}} (a registered
# potential) or {"model_id": ...} (a stored model version, loaded from its checkpoint).
ModelRef = Mapping[str, Any]

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def model_for(ref: ModelRef, store) -> Any:
    """This process's potential for ``ref``, built (and its weights loaded) on first use."""
    key = json.dumps(dict(ref), sort_keys=True, default=str)
    with _MODELS_LOCK:
        potential = _MODELS.get(key)
        if potential is None:
            potential = _MODELS[key] = _build(ref, store)
        return potential


def _build(ref: ModelRef, store) -> Any:
    from pestle.potentials import POTENTIALS, from_checkpoint

    if "model_id" in ref:
        doc = store.models.require(ref["model_id"])
        folder = Path(tempfile.gettempdir()) / "pestle-models"
        path, _ = store.models.fetch_checkpoint(ref["model_id"], folder / str(os.getpid()))
        potential = from_checkpoint(doc.potential or doc.family, doc.potential_params, path)
    else:
        potential = POTENTIALS.build(ref["name"], dict(ref.get("params") or {}))
    load = getattr(potential, "load_model", None)
    if callable(load):  # weights now, not inside the first timed chunk
        load()
    return potential


def load_models(store_uri: str, database: str, refs: Sequence[ModelRef]) -> float:
    """Build the models of ``refs`` in this process; returns the seconds it took."""
    from pestle.store import shared_store

    started = time.perf_counter()
    store = shared_store(store_uri, database)
    for ref in refs:
        model_for(ref, store)
    return time.perf_counter() - started


def score_chunks(
    store_uri: str,
    database: str,
    chunks: Sequence[Sequence[str]],
    main: ModelRef,
    committee: Sequence[ModelRef],
    key: str,
    embeddings: bool,
    pressure: bool = True,
) -> int:
    """Score these chunks of candidates (each chunk one batch: the committee's energy
    spread is relative to its batch) and store the scores under ``key``; returns how many
    were scored."""
    from pestle.scoring import score_batch
    from pestle.store import shared_store

    store = shared_store(store_uri, database)
    potential = model_for(main, store)
    members = [model_for(ref, store) for ref in committee]
    done = 0
    for ids in chunks:
        done += score_and_store(
            store, list(ids), potential, members, key, embeddings, score_batch, pressure=pressure
        )
    return done


def score_and_store(
    store,
    ids: list[str],
    potential,
    committee,
    key: str,
    embeddings: bool,
    score: Callable,
    *,
    pressure: bool = True,
) -> int:
    """One batch: geometry read, scored, scores (and descriptors) written in bulk."""
    atoms = store.structures.atoms_many(ids)
    ids = [i for i in ids if i in atoms]
    if not ids:
        return 0
    batch = [atoms[i] for i in ids]
    scores, vectors = score(batch, potential, committee, embeddings, pressure=pressure)
    store.structures.set_scores(dict(zip(ids, scores, strict=True)), key)
    if vectors is not None:
        store.structures.set_embeddings(dict(zip(ids, vectors, strict=True)), key)
    return len(ids)


def scoring_resources(client) -> dict[str, int] | None:
    """``GPU: 1`` when some worker offers a GPU (the models then run there), else None."""
    from pestle.dispatch.training import workers_with_gpu

    return {"GPU": 1} if workers_with_gpu(client) else None


def worker_threads(client, resources: Mapping[str, int] | None = None) -> int:
    """Threads of the workers a scoring task may run on."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    return sum(
        int(w.get("nthreads", 1))
        for w in workers
        if all((w.get("resources") or {}).get(k, 0) >= v for k, v in (resources or {}).items())
    )


def warm_workers(client, store_uri: str, database: str, refs: Sequence[ModelRef]) -> float:
    """Load the models on every worker (each keeps them); the slowest worker's seconds."""
    return max(client.run(load_models, store_uri, database, list(refs)).values(), default=0.0)


def score_on_workers(
    client,
    store_uri: str,
    database: str,
    chunks: Sequence[Sequence[str]],
    main: ModelRef,
    committee: Sequence[ModelRef],
    key: str,
    embeddings: bool,
    *,
    pressure: bool = True,
    per_task: int = 2,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Score ``chunks`` on the workers, ``per_task`` chunks per task; returns how many
    candidates were scored. ``progress`` is told each task's count as it ends."""
    from distributed import as_completed

    if not chunks:
        return 0
    resources = scoring_resources(client)
    tasks = [list(chunks[i : i + per_task]) for i in range(0, len(chunks), per_task)]
    n = len(tasks)
    futures = client.map(
        score_chunks, [store_uri] * n, [database] * n, tasks, [dict(main)] * n,
        [[dict(c) for c in committee]] * n, [key] * n, [embeddings] * n, [pressure] * n,
        pure=False, resources=resources,
    )  # fmt: skip
    done = 0
    # Results gathered here, not by as_completed's background tasks: a gather of theirs in
    # flight when SIGTERM closes the client logs a traceback from the event loop.
    for future in as_completed(futures):
        count = future.result()
        done += count
        if progress is not None:
            progress(count)
    return done
