"""GPUs on Dask workers: which the local cluster offers, which worker gets which, where a GPU
task is sent, and where it ran.

A local worker with a GPU advertises the Dask resource ``GPU=1`` and sees only its own
device (``CUDA_VISIBLE_DEVICES``), so torch's ``cuda`` on it is that device and two workers
never share one; the other local workers see none, so nothing on them competes for a GPU.
A task that wants a GPU asks for ``resources={"GPU": 1}`` (:func:`gpu_request`); fine-tuning
does, and scoring on workers can.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Literal

log = logging.getLogger("pestle.placement")


def local_gpus(setting: Literal["auto"] | int) -> list[str]:
    """CUDA_VISIBLE_DEVICES ids the local cluster's workers get, from ``dask.gpus``: ``auto``
    every device torch sees (``pestle.devices.detect_gpus``), N the first N, 0 none."""
    from pestle import devices

    if setting == "auto":
        return devices.detect_gpus()
    ids = devices.visible_gpu_ids(int(setting))
    if len(ids) < int(setting):
        log.warning("dask.gpus is %s but CUDA_VISIBLE_DEVICES lists only %s", setting, ids)
    return ids


class GPUWorkers:
    """A LocalCluster ``worker_class``: the first ``len(gpus)`` workers (by name 0, 1, ...)
    each own one GPU; the rest see none. Called by the cluster once per worker it starts,
    with the options LocalCluster gives every worker."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus = list(gpus)

    def options(self, name: Any, options: dict[str, Any]) -> dict[str, Any]:
        env = dict(options.get("env") or {})
        resources = dict(options.get("resources") or {})
        index = name if isinstance(name, int) else -1
        if 0 <= index < len(self.gpus):
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[index]
            resources["GPU"] = 1
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # hidden: CPU work here never lands on a GPU
        return {**options, "env": env, "resources": resources}

    def __call__(self, scheduler: str, **options: Any):
        from distributed import Nanny

        return Nanny(scheduler, **self.options(options.get("name"), options))


def local_worker_class(gpus: list[str], n_workers: int) -> GPUWorkers | None:
    """What ``LocalCluster(worker_class=...)`` takes for these GPUs (None without any)."""
    if not gpus:
        return None
    if len(gpus) > n_workers:
        log.warning(
            "%d GPUs but dask.n_workers is %d: GPUs %s stay unused (raise n_workers)",
            len(gpus), n_workers, ", ".join(gpus[n_workers:]),
        )  # fmt: skip
    log.info(
        "local cluster: GPU %s on worker%s %s",
        ", ".join(gpus[:n_workers]),
        "s" if min(len(gpus), n_workers) > 1 else "",
        ", ".join(str(i) for i in range(min(len(gpus), n_workers))),
    )
    return GPUWorkers(gpus)


def workers_with_gpu(client) -> list[str]:
    """Addresses of the workers that offer at least one GPU."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return [
        addr for addr, info in workers.items() if (info.get("resources") or {}).get("GPU", 0) >= 1
    ]


def gpu_request(client) -> tuple[dict[str, int] | None, str]:
    """(Dask resources to ask for, torch device preference) of a task that prefers a GPU: a
    GPU worker and ``cuda`` when the cluster has one, else any worker and ``cpu``."""
    if workers_with_gpu(client):
        return {"GPU": 1}, "cuda"
    return None, "cpu"


def placement(requested: str, device: str) -> dict[str, Any]:
    """Where the calling task runs: Dask worker (name, address), host, the GPU it was given
    (its CUDA_VISIBLE_DEVICES), the device asked for and the one torch used (with the GPU's
    name). Called inside the task; outside a worker the worker fields are None."""
    from distributed import get_worker

    try:
        worker = get_worker()
        name, address = str(worker.name), worker.address
        offers_gpu = worker.state.total_resources.get("GPU", 0) >= 1
    except ValueError:  # not in a Dask task
        name = address = None
        offers_gpu = False
    out: dict[str, Any] = {
        "worker": name,
        "address": address,
        "host": socket.gethostname(),
        "gpu_worker": offers_gpu,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "requested": requested,
        "device": device,
    }
    if device.startswith("cuda"):
        import torch

        out["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return out


def describe(where: dict[str, Any]) -> str:
    """One line for the log: ``worker 0 (tcp://..., host h), GPU 1: device cuda (NVIDIA...)``."""
    text = f"worker {where.get('worker')} ({where.get('address')}, host {where.get('host')})"
    if where.get("gpu_worker"):
        text += f", GPU {where.get('cuda_visible_devices')}"
    text += f": device {where.get('device')}"
    if where.get("device_name"):
        text += f" ({where['device_name']})"
    if where.get("requested") != where.get("device"):
        text += f", asked for {where.get('requested')}"
    return text
