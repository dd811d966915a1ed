"""The Dask client a campaign runs on: a LocalCluster by default, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pestle.config import DaskSpec

log = logging.getLogger("pestle.dispatch")


def worker_environment() -> dict[str, str]:
    """Keep each worker to its own core: a DFT code or torch spawning threads per worker on
    top of Dask's workers oversubscribes the machine."""
    return {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@contextmanager
def make_client(spec: DaskSpec) -> Iterator[object]:
    """A ``distributed.Client`` for the campaign, closed (with its cluster) on exit.

    Local workers advertise ``CPU`` resources equal to their threads; a GPU would be
    advertised by the user's own workers (``dask worker --resources GPU=1``), and the
    fine-tuning task asks for it only when some worker offers one.
    """
    from distributed import Client, LocalCluster

    if spec.scheduler_address:
        log.info("connecting to the Dask scheduler at %s", spec.scheduler_address)
        client = Client(spec.scheduler_address)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=spec.n_workers,
        threads_per_worker=spec.threads_per_worker,
        memory_limit=spec.memory_limit,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        resources={"CPU": spec.threads_per_worker},
        env={k: v for k, v in worker_environment().items() if k not in os.environ},
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
