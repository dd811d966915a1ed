"""The Dask client a campaign runs on: a LocalCluster by default, an existing scheduler
(optionally over TLS), or a Slurm/PBS cluster through dask-jobqueue."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pestle.config import DaskSpec, JobqueueSpec
from pestle.dispatch.gpus import local_gpus, local_worker_class

log = logging.getLogger("pestle.dispatch")


def worker_environment() -> dict[str, str]:
    """Keep each worker to its own core: a DFT code or torch spawning threads per worker on
    top of Dask's workers oversubscribes the machine."""
    return {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def security_for(spec: DaskSpec):
    """``distributed.security.Security`` from the config's PEM files, or None."""
    if not spec.tls_ca_file:
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=str(spec.tls_ca_file),
        tls_client_cert=str(spec.tls_client_cert),
        tls_client_key=str(spec.tls_client_key),
        require_encryption=True,
    )


def jobqueue_cluster(spec: JobqueueSpec, **kwargs):
    """A dask-jobqueue cluster (not yet scaled). Workers advertise ``CPU`` (and ``GPU``)
    resources so labelling and fine-tuning tasks land where they can run."""
    from dask_jobqueue import PBSCluster, SLURMCluster

    resources = f"CPU={spec.cores // spec.processes}"
    if spec.gpus_per_job:
        resources += f",GPU={spec.gpus_per_job}"
    directives = list(spec.job_extra_directives)
    if spec.gpus_per_job:
        directives.append(
            f"--gres=gpu:{spec.gpus_per_job}"
            if spec.system == "slurm"
            else f"-l ngpus={spec.gpus_per_job}"
        )
    cluster_class = SLURMCluster if spec.system == "slurm" else PBSCluster
    return cluster_class(
        cores=spec.cores,
        memory=spec.memory,
        processes=spec.processes,
        walltime=spec.walltime,
        queue=spec.queue,
        account=spec.account,
        job_extra_directives=directives,
        job_script_prologue=[
            *spec.job_script_prologue,
            *(f"export {k}={v}" for k, v in worker_environment().items()),
        ],
        worker_extra_args=["--resources", resources],
        local_directory=spec.local_directory,
        **kwargs,
    )


@contextmanager
def make_client(spec: DaskSpec) -> Iterator[object]:
    """A ``distributed.Client`` for the campaign, closed (with its cluster) on exit.

    Local workers advertise ``CPU`` resources equal to their threads, and those given a GPU
    (``dask.gpus``, see ``pestle.dispatch.gpus``) ``GPU=1``; elsewhere a GPU is advertised by
    the user's own workers (``dask worker --resources GPU=1``) or by ``jobqueue.gpus_per_job``.
    The fine-tuning task asks for one only when some worker offers one.
    """
    from distributed import Client, LocalCluster

    if spec.scheduler_address:
        log.info("connecting to the Dask scheduler at %s", spec.scheduler_address)
        client = Client(spec.scheduler_address, security=security_for(spec))
        try:
            yield client
        finally:
            client.close()
        return
    if spec.jobqueue is not None:
        cluster = jobqueue_cluster(spec.jobqueue)
        cluster.scale(jobs=spec.jobqueue.jobs)
    else:
        gpus = local_gpus(spec.gpus)
        cluster = LocalCluster(
            n_workers=spec.n_workers,
            threads_per_worker=spec.threads_per_worker,
            memory_limit=spec.memory_limit,
            processes=True,
            host=spec.host,
            dashboard_address=f"{spec.host}:0",  # ":0" would listen on every interface
            resources={"CPU": spec.threads_per_worker},
            env={k: v for k, v in worker_environment().items() if k not in os.environ},
            # dask.gpus: one GPU per worker, offered as the Dask resource GPU=1.
            worker_class=local_worker_class(gpus, spec.n_workers),
        )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
